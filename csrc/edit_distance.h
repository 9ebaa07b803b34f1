// Levenshtein distance against a threshold, for the PPM pair export's "steps differ enough" test
// (rstar_fast/search/export.py): the one text loop of the exports, run for every candidate pair.
#pragma once

#include <cstdint>

namespace rstar {

// Whether the edit distance of a[0..n) and b[0..m) (code points) is at least k. Banded: only the
// cells within k of the diagonal can be below k, so the work is O(max(n, m) * k), and it stops
// at the first row whose every cell has reached k.
bool edit_distance_at_least(const uint32_t* a, int64_t n, const uint32_t* b, int64_t m, int64_t k);

}  // namespace rstar
