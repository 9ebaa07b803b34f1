#include "forest.h"
namespace rstar {
int core_version() { return 1; }
}
