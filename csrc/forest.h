#pragma once
namespace rstar {
int core_version();
}
