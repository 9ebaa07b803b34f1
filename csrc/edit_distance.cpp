#include "edit_distance.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace rstar {

bool edit_distance_at_least(const uint32_t* a, int64_t n, const uint32_t* b, int64_t m, int64_t k) {
  if (k <= 0) return true;
  if (n < m) {
    std::swap(a, b);
    std::swap(n, m);
  }
  if (k > n) return false;      // no distance exceeds the longer length (and i + k cannot overflow)
  if (n - m >= k) return true;  // at least that many insertions
  // Distances are capped at k: only "below k" matters. Cells outside the band hold k.
  std::vector<int64_t> prev(m + 1), cur(m + 1, k);
  for (int64_t j = 0; j <= m; ++j) prev[j] = std::min(j, k);
  for (int64_t i = 1; i <= n; ++i) {
    const int64_t lo = std::max<int64_t>(1, i - k), hi = std::min(m, i + k);
    cur[0] = std::min(i, k);
    if (lo > 1) cur[lo - 1] = k;       // the left neighbour of the band's first cell
    if (hi < m) cur[hi + 1] = k;       // read by the next row, whose band may reach one further
    int64_t row_min = lo == 1 ? cur[0] : k;
    const uint32_t ca = a[i - 1];
    for (int64_t j = lo; j <= hi; ++j) {
      const int64_t v = std::min({prev[j - 1] + (ca != b[j - 1]), prev[j] + 1, cur[j - 1] + 1, k});
      cur[j] = v;
      row_min = std::min(row_min, v);
    }
    if (row_min >= k) return true;
    std::swap(prev, cur);
  }
  return prev[m] >= k;
}

}  // namespace rstar
