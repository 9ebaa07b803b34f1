#include <pybind11/pybind11.h>
#include "forest.h"
PYBIND11_MODULE(_core, m) { m.def("core_version", &rstar::core_version); }
