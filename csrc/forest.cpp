#include "forest.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>

#include <sys/mman.h>
#include <unistd.h>

#include "node_store.h"
#include "thread_pool.h"

namespace rstar {

using detail::kChunkMask;
using detail::kChunkNodes;
using detail::kChunkShift;
using detail::kNaN;
using detail::kNone32;
using detail::NodeChunk;
using detail::NodeStats;
using detail::SpanArena;

namespace {

// Items per block for the thread pool: below 2 * grain a call runs inline on the caller.
constexpr int64_t kGrainSelect = 64;
constexpr int64_t kGrainExpand = 64;
constexpr int64_t kGrainUpdate = 256;
constexpr int64_t kGrainGetter = 8192;
constexpr int64_t kGrainPayload = 256;

std::string item(const char* what, int64_t i) { return std::string(what) + "[" + std::to_string(i) + "]"; }

// Decrements a counter when it is positive; false (and no change) when it is 0.
bool decrement_if_positive(std::atomic<uint32_t>& counter) {
  uint32_t cur = counter.load(std::memory_order_relaxed);
  while (cur > 0) {
    if (counter.compare_exchange_weak(cur, cur - 1, std::memory_order_relaxed)) return true;
  }
  return false;
}

}  // namespace

size_t Forest::bytes_per_node() { return detail::kBytesPerNode; }
int64_t Forest::max_nodes() { return static_cast<int64_t>(detail::kMaxNodes); }

namespace detail {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kChunkBytes = (sizeof(NodeChunk) + kHugePage - 1) / kHugePage * kHugePage;
}  // namespace

NodeChunk* allocate_chunk() {
  // Over-map by one huge page, keep the 2 MiB aligned middle, return the rest.
  void* raw = mmap(nullptr, kChunkBytes + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(uintptr_t{kHugePage} - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = aligned + kChunkBytes;
  if (start + kChunkBytes + kHugePage > tail) munmap(reinterpret_cast<void*>(tail), start + kChunkBytes + kHugePage - tail);
  madvise(reinterpret_cast<void*>(aligned), kChunkBytes, MADV_HUGEPAGE);  // best effort
  // Zero-filled pages are a valid NodeChunk: every field and atomic starts at 0.
  return reinterpret_cast<NodeChunk*>(aligned);
}

void free_chunk(NodeChunk* chunk) {
  if (chunk != nullptr) munmap(chunk, kChunkBytes);
}

}  // namespace detail

Forest::Forest(const ForestOptions& options) : options_(options) {
  if (!std::isfinite(options.c_uct) || options.c_uct < 0)
    throw InvalidValueError("c_uct must be finite and >= 0, got " + std::to_string(options.c_uct));
  if (options.max_depth < 0 || static_cast<uint32_t>(options.max_depth) > detail::kMaxDepth)
    throw InvalidValueError("max_depth must be in [0, " + std::to_string(detail::kMaxDepth) +
                            "], got " + std::to_string(options.max_depth));
  if (!std::isfinite(options.virtual_loss) || options.virtual_loss < 0)
    throw InvalidValueError("virtual_loss must be finite and >= 0, got " +
                            std::to_string(options.virtual_loss));
  if (options.num_threads < 0)
    throw InvalidValueError("num_threads must be >= 0 (0: all cores), got " +
                            std::to_string(options.num_threads));
  pool_ = std::make_unique<ThreadPool>(options.num_threads);
  options_.num_threads = pool_->size();
  chunks_.reset(new std::atomic<NodeChunk*>[detail::kMaxNodeChunks]());
  text_arena_ = std::make_unique<SpanArena>();
  token_arena_ = std::make_unique<SpanArena>();
}

Forest::~Forest() {
  for (uint32_t c = 0; c < detail::kMaxNodeChunks; ++c) detail::free_chunk(chunks_[c].load(std::memory_order_relaxed));
}

int Forest::num_threads() const { return pool_->size(); }

template <typename F>
void Forest::parallel(int64_t n, int64_t grain, F&& fn) const {
  const std::function<void(int64_t, int64_t)> body = std::forward<F>(fn);
  pool_->parallel_for(n, grain, body);
}

bool Forest::exists(NodeId id) const {
  if (id < 0 || static_cast<uint64_t>(id) >= reserved_.load(std::memory_order_acquire)) return false;
  NodeChunk* c = chunks_[static_cast<uint64_t>(id) >> kChunkShift].load(std::memory_order_acquire);
  // An id another thread has reserved but not yet created (its add_trees or expand still
  // running) is below num_nodes with a zeroed record: first_child, never 0 for a created node
  // (children follow their parent), is stored last by init_node, with release.
  return c != nullptr &&
         std::atomic_ref<uint32_t>(c->links[static_cast<uint64_t>(id) & kChunkMask].first_child)
                 .load(std::memory_order_acquire) != 0;
}

void Forest::check_ids(const NodeId* ids, int64_t m, const char* what) const {
  for (int64_t i = 0; i < m; ++i) {
    if (!exists(ids[i]))
      throw UnknownNodeError(item(what, i) + " = " + std::to_string(ids[i]) +
                             " is not a node of this forest (num_nodes = " +
                             std::to_string(num_nodes()) + ")");
  }
}

// Hands out n contiguous ids whose chunks exist. The chunks are allocated first and the ids
// published (reserved_ advanced) after, so an allocation that fails (std::bad_alloc) leaves
// num_nodes as it was, and every id below num_nodes always has its chunk: a chunk allocated for
// a failed or lost attempt is merely early, and the next ids use it. The only lock on the node
// arena: taken when a chunk is missing, i.e. once per 65536 nodes.
uint32_t Forest::reserve_nodes(int64_t n) {
  uint64_t first = reserved_.load(std::memory_order_acquire);
  for (;;) {
    if (first + static_cast<uint64_t>(n) > detail::kMaxNodes)
      throw InvalidValueError("the forest is full: " + std::to_string(first) + " nodes, " +
                              std::to_string(n) + " more requested, limit " +
                              std::to_string(detail::kMaxNodes));
    if (n == 0) return static_cast<uint32_t>(first);
    const uint64_t last = first + static_cast<uint64_t>(n) - 1;
    for (uint64_t c = first >> kChunkShift; c <= (last >> kChunkShift); ++c) {
      if (chunks_[c].load(std::memory_order_acquire) != nullptr) continue;
      std::lock_guard<std::mutex> lock(chunk_mutex_);
      if (chunks_[c].load(std::memory_order_relaxed) == nullptr)
        chunks_[c].store(detail::allocate_chunk(), std::memory_order_release);
    }
    if (reserved_.compare_exchange_weak(first, last + 1, std::memory_order_acq_rel))
      return static_cast<uint32_t>(first);
  }
}

// A node's id is never reused and its chunk comes zeroed from the OS, so the fields whose
// initial value is all-zero bits (payload refs, an unscored node's statistics) are left as they
// are: storing them would only pull two more cache lines of fresh memory per few children.
void Forest::init_node(uint32_t id, uint32_t parent, uint32_t depth, float value, uint8_t flags) {
  NodeChunk& c = chunk(id);
  const uint32_t i = id & kChunkMask;
  c.links[i].parent = parent;
  c.depth[i] = static_cast<uint16_t>(depth);
  c.links[i].child_count = 0;
  c.links[i].state.store(kFresh, std::memory_order_relaxed);
  c.links[i].flags.store(std::isnan(value) ? flags : static_cast<uint8_t>(flags | kFlagValued),
                         std::memory_order_relaxed);
  c.links[i].leaf_pending.store(0, std::memory_order_relaxed);
  c.prior[i].store(1.0f, std::memory_order_relaxed);
  if (std::isnan(value)) {
    c.first_value[i].store(kNaN, std::memory_order_relaxed);
  } else {
    c.stats[i].counts.store(NodeStats::kVisit, std::memory_order_relaxed);
    c.stats[i].value_sum.store(static_cast<double>(value), std::memory_order_relaxed);
    c.first_value[i].store(value, std::memory_order_relaxed);
  }
  // last: a nonzero first_child marks the node created (exists), and publishes the fields above
  std::atomic_ref<uint32_t>(c.links[i].first_child).store(kNone32, std::memory_order_release);
}

void Forest::add_value(uint32_t node, double value, uint64_t delta) {
  NodeChunk& c = chunk(node);
  const uint32_t i = node & kChunkMask;
  const uint64_t before = c.stats[i].counts.fetch_add(delta, std::memory_order_relaxed);
  if (NodeStats::visits_of(before) >= NodeStats::kMaxVisits) [[unlikely]] {
    // saturated: this visit (and its value) is not counted, its pending part still is; the
    // 256 ids of room below 2^32 hold the adds of threads that raced it, so none carries
    c.stats[i].counts.fetch_sub(NodeStats::kVisit, std::memory_order_relaxed);
    return;
  }
  c.stats[i].value_sum.fetch_add(value, std::memory_order_relaxed);
  if (!(c.links[i].flags.load(std::memory_order_relaxed) & kFlagValued)) {
    float expected = kNaN;  // the canonical NaN every node starts with (CAS compares bits)
    c.first_value[i].compare_exchange_strong(expected, static_cast<float>(value),
                                             std::memory_order_relaxed);
    c.links[i].flags.fetch_or(kFlagValued, std::memory_order_relaxed);
  }
}

// ---- search -----------------------------------------------------------------------------------

void Forest::check_add_trees(int64_t n) const {
  if (n < 0) throw InvalidValueError("add_trees: n must be >= 0, got " + std::to_string(n));
  const int64_t room = max_nodes() - num_nodes();
  if (n > room)
    throw InvalidValueError("add_trees: n = " + std::to_string(n) + " is more than the forest has room for (" +
                            std::to_string(room) + " more nodes; limit " + std::to_string(max_nodes()) + ")");
}

int Forest::current_pid() { return static_cast<int>(::getpid()); }

std::shared_mutex& Forest::structure_mutex() const {
  const int pid = current_pid();
  if (pid != structure_pid_) {  // a fork's copy: a thread the fork left behind may hold the lock
    (void)structure_mutex_.release();
    structure_mutex_ = std::make_unique<std::shared_mutex>();
    structure_pid_ = pid;
  }
  return *structure_mutex_;
}

void Forest::add_trees(int64_t n, NodeId* out) {
  check_add_trees(n);
  std::shared_lock structure(structure_mutex());
  const uint32_t first = reserve_nodes(n);
  for (int64_t i = 0; i < n; ++i) {
    init_node(first + static_cast<uint32_t>(i), kNone32, 0, kNaN, 0);
    out[i] = static_cast<NodeId>(first) + i;
  }
  num_trees_.fetch_add(n, std::memory_order_relaxed);
}

// Descents for roots[begin, end). Each descent alternates two steps per level: (1) read the
// node's links (leaf? terminal?) and start loading its children's records; (2) score the
// children, take the best and start loading its links. Up to kLanes descents of different trees
// advance in turn, so each one's memory loads overlap the others' work: a batch walks thousands
// of trees whose nodes are far apart and is otherwise bound by memory latency. Descents of the
// same tree never overlap (a repeated root waits for the earlier one to finish), so the results
// are exactly those of doing the roots one after the other.
// Templated on the two switches the scoring loop would otherwise test per child. The arithmetic
// is written in the reference's order (python_tests/reference_mcts.py): scores agree bit for bit.
template <bool kVirtualLoss, bool kPuct>
void Forest::select_range(const NodeId* roots, int64_t begin, int64_t end, NodeId* out, bool from_leaf) {
  constexpr int kLanes = 16;
  struct Walk {
    uint32_t root, node;
    int64_t index;
    bool children_loading;
  };
  const double c_uct = options_.c_uct;
  const double vl = options_.virtual_loss;
  auto prefetch_node = [&](uint32_t n) {
    const NodeChunk& c = chunk(n);
    __builtin_prefetch(&c.links[n & kChunkMask]);
    __builtin_prefetch(&c.stats[n & kChunkMask]);
  };
  // A descent ends without moving its simulation (kNoNode, or its start that is not expanded):
  // the simulation, which descend claimed from the start's leaf_pending, stays there.
  auto stay = [&](Walk& w, NodeId result) {
    if (from_leaf) chunk(w.root).links[w.root & kChunkMask].leaf_pending.fetch_add(1, std::memory_order_relaxed);
    out[w.index] = result;
  };
  // One step of a descent; true when it has finished (out[index] written).
  auto step = [&](Walk& w) -> bool {
    NodeChunk& c = chunk(w.node);
    const uint32_t i = w.node & kChunkMask;
    if (!w.children_loading) {
      if (c.links[i].flags.load(std::memory_order_relaxed) & kFlagTerminal) {
        stay(w, kNoNode);
        return true;
      }
      if (c.links[i].state.load(std::memory_order_acquire) != kExpanded) {  // the leaf
        if (from_leaf && w.node == w.root) {  // the start is not expanded: it stays the leaf
          stay(w, w.node);
          return true;
        }
        // For a descent the simulation was claimed from the start (descend), so it now ends
        // at the new leaf.
        c.links[i].leaf_pending.fetch_add(1, std::memory_order_relaxed);
        // Virtual loss on the path, leaf up to the root (for a descent: up to its start, whose
        // path already carries the simulation's pending visit).
        const uint32_t stop = from_leaf ? w.root : kNone32;
        for (uint32_t n = w.node; n != stop;) {
          NodeChunk& pc = chunk(n);
          pc.stats[n & kChunkMask].counts.fetch_add(NodeStats::kPending, std::memory_order_relaxed);
          n = pc.links[n & kChunkMask].parent;
        }
        out[w.index] = w.node;
        return true;
      }
      const uint32_t first = c.links[i].first_child, count = c.links[i].child_count;
      for (uint32_t k = 0; k < count; k += 4) prefetch_node(first + k);  // 4 records per line
      if (count > 0) prefetch_node(first + count - 1);
      if (kPuct && count > 0) __builtin_prefetch(&chunk(first).prior[first & kChunkMask]);
      w.children_loading = true;
      return false;
    }
    const uint32_t first = c.links[i].first_child, count = c.links[i].child_count;
    const uint64_t parent_counts = c.stats[i].load();
    double parent_n = static_cast<double>(NodeStats::visits_of(parent_counts));
    if (kVirtualLoss) parent_n += NodeStats::in_flight_of(parent_counts);
    const double parent_log_n = !kPuct && parent_n > 0 ? std::log(parent_n) : 0.0;
    const double parent_sqrt_n = kPuct ? std::sqrt(parent_n) : 0.0;
    uint32_t best = kNone32;
    double best_score = 0.0;
    for (uint32_t k = 0; k < count; ++k) {
      const uint32_t child = first + k;
      const NodeChunk& cc = chunk(child);
      const uint32_t ci = child & kChunkMask;
      if (cc.links[ci].flags.load(std::memory_order_relaxed) & kFlagTerminal) continue;
      const NodeStats& st = cc.stats[ci];
      const uint64_t counts = st.load();
      double n = static_cast<double>(NodeStats::visits_of(counts));
      double w_sum = st.value_sum.load(std::memory_order_relaxed);
      if (kVirtualLoss) {
        const int32_t pending = NodeStats::in_flight_of(counts);
        n += pending;
        w_sum -= vl * pending;
      }
      double s = n > 0 ? w_sum / n : 0.0;
      if (kPuct) {
        s += c_uct * static_cast<double>(cc.prior[ci].load(std::memory_order_relaxed)) * parent_sqrt_n / (1.0 + n);
      } else if (parent_n > 0 && n > 0) {
        s += c_uct * std::sqrt(parent_log_n / n);
      }
      if (best == kNone32 || s > best_score) {  // strict: ties go to the first child
        best = child;
        best_score = s;
      }
    }
    if (best == kNone32) {  // all children terminal (or none): a dead end
      c.links[i].flags.fetch_or(kFlagTerminal | kFlagDeadEnd, std::memory_order_relaxed);
      stay(w, kNoNode);
      return true;
    }
    w.node = best;
    w.children_loading = false;
    prefetch_node(best);
    return false;
  };

  Walk lanes[kLanes];
  int active = 0;
  int64_t next = begin;
  for (;;) {
    while (active < kLanes && next < end) {
      const uint32_t r = static_cast<uint32_t>(roots[next]);
      bool busy = false;
      for (int j = 0; j < active; ++j) busy |= lanes[j].root == r;
      if (busy) break;  // same tree: wait until the earlier descent is done
      lanes[active++] = Walk{r, r, next++, false};
      prefetch_node(r);
    }
    if (active == 0) break;
    for (int j = 0; j < active;) {
      if (step(lanes[j])) {
        lanes[j] = lanes[--active];
      } else {
        ++j;
      }
    }
  }
}

void Forest::select(const NodeId* roots, int64_t k, NodeId* out) {
  check_ids(roots, k, "roots");
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t r = static_cast<uint32_t>(roots[i]);
    if (chunk(r).links[r & kChunkMask].parent != kNone32)
      throw NodeStateError(item("roots", i) + " = " + std::to_string(roots[i]) +
                           " is not a root (select starts at a tree's root)");
  }
  run_select(roots, k, out, false);
}

void Forest::descend(const NodeId* leaves, int64_t k, NodeId* out) {
  check_ids(leaves, k, "leaves");
  // Claim the simulation of every leaf (decrement-if-positive, as backprop and cancel do), all
  // or nothing; the descents then move each claimed simulation down, or give it back.
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t l = static_cast<uint32_t>(leaves[i]);
    if (!decrement_if_positive(chunk(l).links[l & kChunkMask].leaf_pending)) {
      for (int64_t j = 0; j < i; ++j) {
        const uint32_t lj = static_cast<uint32_t>(leaves[j]);
        chunk(lj).links[lj & kChunkMask].leaf_pending.fetch_add(1, std::memory_order_relaxed);
      }
      throw NodeStateError(item("leaves", i) + " = " + std::to_string(leaves[i]) +
                           " holds no pending simulation (descend continues a select)");
    }
  }
  run_select(leaves, k, out, true);
}

void Forest::run_select(const NodeId* starts, int64_t k, NodeId* out, bool from_leaf) {
  const bool vl = options_.virtual_loss > 0, puct = options_.rule == Rule::kPuct;
  using Range = void (Forest::*)(const NodeId*, int64_t, int64_t, NodeId*, bool);
  const Range range = vl ? (puct ? &Forest::select_range<true, true> : &Forest::select_range<true, false>)
                         : (puct ? &Forest::select_range<false, true> : &Forest::select_range<false, false>);
  parallel(k, kGrainSelect, [&](int64_t b, int64_t e) { (this->*range)(starts, b, e, out, from_leaf); });
}

int64_t Forest::expand(const NodeId* leaves, const int64_t* counts, int64_t k, const float* values,
                       int64_t num_values, NodeId* out) {
  return expand(leaves, counts, k, values, num_values, out, ExpandPayloads{});
}

int64_t Forest::expand(const NodeId* leaves, const int64_t* counts, int64_t k, const float* values,
                       int64_t num_values, NodeId* out, const ExpandPayloads& payloads) {
  std::shared_lock structure(structure_mutex());
  // Validate everything first.
  check_ids(leaves, k, "leaves");
  int64_t total = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (counts[i] < 0 || counts[i] > detail::kMaxChildren)
      throw InvalidValueError(item("counts", i) + " = " + std::to_string(counts[i]) +
                              " is out of range [0, " + std::to_string(detail::kMaxChildren) + "]");
    total += counts[i];
  }
  if (total != num_values)
    throw ShapeError("expand: sum(counts) = " + std::to_string(total) + " but len(values) = " +
                     std::to_string(num_values));
  for (int64_t j = 0; j < num_values; ++j) {
    if (std::isinf(values[j]))
      throw InvalidValueError(item("values", j) + " is infinite (use NaN for an unvisited child)");
  }
  const bool with_texts = payloads.text_ptrs != nullptr, with_tokens = payloads.token_ptrs != nullptr;
  std::vector<int64_t> text_bytes, token_bytes;
  if (with_texts) text_bytes = payload_bytes("texts", payloads.text_lens, num_values, 1);
  if (with_tokens) {
    token_bytes = payload_bytes("tokens", payloads.token_lens, num_values, sizeof(int32_t));
    check_token_ids("tokens", payloads.token_ptrs, payloads.token_lens, num_values);
  }
  std::vector<uint64_t> text_refs(with_texts ? static_cast<size_t>(num_values) : 0);
  std::vector<uint64_t> token_refs(with_tokens ? static_cast<size_t>(num_values) : 0);
  auto state_error = [&](int64_t i, uint8_t state) {
    const std::string what = item("leaves", i) + " = " + std::to_string(leaves[i]);
    if (state == kExpanded) return NodeStateError(what + " is already expanded");
    return NodeStateError(what + " is being expanded by another call");
  };
  // Depths are read here, in a loop with independent loads, rather than in the init loop below
  // where each one would be a cache miss behind a row of stores.
  std::vector<uint16_t> depths(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t l = static_cast<uint32_t>(leaves[i]);
    const NodeChunk& c = chunk(l);
    depths[i] = c.depth[l & kChunkMask];
    if (c.links[l & kChunkMask].flags.load(std::memory_order_relaxed) & kFlagTerminal)
      throw NodeStateError(item("leaves", i) + " = " + std::to_string(leaves[i]) +
                           " is terminal and cannot be expanded");
    const uint8_t s = c.links[l & kChunkMask].state.load(std::memory_order_acquire);
    if (s != kFresh) throw state_error(i, s);
  }
  // Claim every leaf (CAS fresh -> expanding); on a lost race give all claims back.
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t l = static_cast<uint32_t>(leaves[i]);
    uint8_t expected = kFresh;
    if (!chunk(l).links[l & kChunkMask].state.compare_exchange_strong(expected, kExpanding,
                                                                std::memory_order_acq_rel)) {
      for (int64_t j = 0; j < i; ++j) {
        const uint32_t lj = static_cast<uint32_t>(leaves[j]);
        chunk(lj).links[lj & kChunkMask].state.store(kFresh, std::memory_order_release);
      }
      // A duplicate in the batch fails here on its own earlier claim (cheaper than sorting).
      if (std::find(leaves, leaves + i, leaves[i]) != leaves + i)
        throw InvalidValueError("leaves: node " + std::to_string(leaves[i]) +
                                " appears twice (a node is expanded once)");
      throw state_error(i, expected);
    }
  }
  // Room for the payloads, then the ids: anything that can fail comes before the ids are
  // published (payload room that a failure leaves unused is only wasted).
  uint32_t first;
  try {
    if (with_texts) text_arena_->reserve(text_bytes.data(), num_values, text_refs.data());
    if (with_tokens) token_arena_->reserve(token_bytes.data(), num_values, token_refs.data());
    first = reserve_nodes(total);
  } catch (...) {
    for (int64_t i = 0; i < k; ++i) {
      const uint32_t l = static_cast<uint32_t>(leaves[i]);
      chunk(l).links[l & kChunkMask].state.store(kFresh, std::memory_order_release);
    }
    throw;
  }
  std::vector<int64_t> starts(static_cast<size_t>(k) + 1, 0);
  for (int64_t i = 0; i < k; ++i) starts[i + 1] = starts[i] + counts[i];
  parallel(k, kGrainExpand, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint32_t l = static_cast<uint32_t>(leaves[i]);
      NodeChunk& c = chunk(l);
      const uint32_t li = l & kChunkMask;
      const uint32_t depth = depths[i] + 1u;
      const uint8_t child_flags = depth > static_cast<uint32_t>(options_.max_depth)
                                      ? static_cast<uint8_t>(kFlagTerminal | kFlagTooDeep)
                                      : uint8_t{0};
      const uint32_t base = first + static_cast<uint32_t>(starts[i]);
      for (int64_t j = 0; j < counts[i]; ++j) {
        const int64_t v = starts[i] + j;  // the child's index in the call's arrays
        const uint32_t id = base + static_cast<uint32_t>(j);
        const uint8_t flags = payloads.terminal != nullptr && payloads.terminal[v] != 0
                                  ? static_cast<uint8_t>(child_flags | kFlagTerminal)
                                  : child_flags;
        init_node(id, l, depth, values[v], flags);
        out[v] = static_cast<NodeId>(id);
      }
      // Payloads before the release store of kExpanded below, which publishes them too; in a
      // loop of their own, so that the common call without them pays nothing per child.
      if (with_texts || with_tokens) {
        for (int64_t j = 0; j < counts[i]; ++j) {
          const int64_t v = starts[i] + j;
          const uint32_t id = base + static_cast<uint32_t>(j);
          NodeChunk& cc = chunk(id);
          if (with_texts && text_bytes[v] > 0) {
            std::memcpy(text_arena_->data(text_refs[v]), payloads.text_ptrs[v], static_cast<size_t>(text_bytes[v]));
            cc.text_ref[id & kChunkMask].store(text_refs[v], std::memory_order_release);
          }
          if (with_tokens && token_bytes[v] > 0) {
            std::memcpy(token_arena_->data(token_refs[v]), payloads.token_ptrs[v], static_cast<size_t>(token_bytes[v]));
            cc.token_ref[id & kChunkMask].store(token_refs[v], std::memory_order_release);
          }
        }
      }
      // atomic: exists() may read it from another thread at any time (children are published by
      // the release store of kExpanded below)
      std::atomic_ref<uint32_t>(c.links[li].first_child).store(counts[i] > 0 ? base : kNone32,
                                                               std::memory_order_relaxed);
      c.links[li].child_count = static_cast<uint16_t>(counts[i]);
      // A node expanded with no children can never be expanded again: a dead end.
      if (counts[i] == 0) c.links[li].flags.fetch_or(kFlagTerminal | kFlagDeadEnd, std::memory_order_relaxed);
      c.links[li].state.store(kExpanded, std::memory_order_release);
    }
  });
  return total;
}

// Claims the simulation each item ends (one leaf_pending each) and writes its leaf to ends.
// All or nothing: on a failure every claim is given back and the error names the item.
void Forest::end_simulations(const NodeId* nodes, int64_t m, const NodeId* leaves,
                             const char* what, std::vector<uint32_t>& ends) {
  check_ids(nodes, m, what);
  if (leaves != nullptr) {
    check_ids(leaves, m, "leaves");
    for (int64_t i = 0; i < m; ++i) {
      uint32_t n = static_cast<uint32_t>(nodes[i]);
      while (n != kNone32 && n != static_cast<uint32_t>(leaves[i])) n = chunk(n).links[n & kChunkMask].parent;
      if (n == kNone32)
        throw InvalidValueError(item("leaves", i) + " = " + std::to_string(leaves[i]) +
                                " is not " + item(what, i) + " = " + std::to_string(nodes[i]) +
                                " or one of its ancestors");
    }
  }
  ends.assign(static_cast<size_t>(m), kNone32);
  parallel(m, kGrainUpdate, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      uint32_t n = static_cast<uint32_t>(leaves != nullptr ? leaves[i] : nodes[i]);
      if (decrement_if_positive(chunk(n).links[n & kChunkMask].leaf_pending)) {
        ends[i] = n;
        continue;
      }
      if (leaves != nullptr) continue;
      n = chunk(n).links[n & kChunkMask].parent;
      if (n != kNone32 && decrement_if_positive(chunk(n).links[n & kChunkMask].leaf_pending)) ends[i] = n;
    }
  });
  const auto failed = std::find(ends.begin(), ends.end(), kNone32);
  if (failed == ends.end()) return;
  for (uint32_t n : ends) {
    if (n != kNone32) chunk(n).links[n & kChunkMask].leaf_pending.fetch_add(1, std::memory_order_relaxed);
  }
  const int64_t i = failed - ends.begin();
  const NodeId where = leaves != nullptr ? leaves[i] : nodes[i];
  throw NodeStateError(item(leaves != nullptr ? "leaves" : what, i) + " = " + std::to_string(where) +
                       (leaves != nullptr ? " is not" : " is neither") +
                       " the leaf of a pending select" +
                       (leaves != nullptr ? "" : " nor a child of one") +
                       " (each select ends in exactly one backprop or cancel)");
}

void Forest::backprop(const NodeId* nodes, const float* rewards, int64_t m, const NodeId* leaves) {
  for (int64_t i = 0; i < m; ++i) {
    if (!std::isfinite(rewards[i]))
      throw InvalidValueError(item("rewards", i) + " is not finite");
  }
  std::vector<uint32_t> ends;
  end_simulations(nodes, m, leaves, "nodes", ends);
  parallel(m, kGrainUpdate, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      // One walk: from the ended select's leaf up (always the node or an ancestor), the same
      // atomic add that counts the visit also removes the pending one.
      const double r = rewards[i];
      uint64_t delta = NodeStats::kVisit;
      for (uint32_t n = static_cast<uint32_t>(nodes[i]); n != kNone32; n = chunk(n).links[n & kChunkMask].parent) {
        if (n == ends[i]) delta = NodeStats::kVisit - NodeStats::kPending;  // wraps: +1 low, -1 high
        add_value(n, r, delta);
      }
    }
  });
}

void Forest::cancel(const NodeId* leaves, int64_t m) {
  std::vector<uint32_t> ends;
  end_simulations(leaves, m, nullptr, "leaves", ends);
  parallel(m, kGrainUpdate, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      for (uint32_t n = ends[i]; n != kNone32;) {
        NodeChunk& c = chunk(n);
        c.stats[n & kChunkMask].counts.fetch_sub(NodeStats::kPending, std::memory_order_relaxed);
        n = c.links[n & kChunkMask].parent;
      }
    }
  });
}

void Forest::update_local(const NodeId* nodes, const float* values, int64_t m) {
  check_ids(nodes, m, "nodes");
  for (int64_t i = 0; i < m; ++i) {
    if (!std::isfinite(values[i])) throw InvalidValueError(item("values", i) + " is not finite");
  }
  parallel(m, kGrainUpdate, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) add_value(static_cast<uint32_t>(nodes[i]), values[i], NodeStats::kVisit);
  });
}

void Forest::update_path(const NodeId* nodes, const float* values, int64_t m) {
  check_ids(nodes, m, "nodes");
  for (int64_t i = 0; i < m; ++i) {
    if (!std::isfinite(values[i])) throw InvalidValueError(item("values", i) + " is not finite");
  }
  parallel(m, kGrainUpdate, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      for (uint32_t n = static_cast<uint32_t>(nodes[i]); n != kNone32; n = chunk(n).links[n & kChunkMask].parent)
        add_value(n, values[i], NodeStats::kVisit);
    }
  });
}

void Forest::set_terminal(const NodeId* nodes, int64_t m) {
  check_ids(nodes, m, "nodes");
  parallel(m, kGrainGetter, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint32_t n = static_cast<uint32_t>(nodes[i]);
      chunk(n).links[n & kChunkMask].flags.fetch_or(kFlagTerminal, std::memory_order_relaxed);
    }
  });
}

void Forest::set_flags(const NodeId* nodes, const uint8_t* flags, int64_t m) {
  check_ids(nodes, m, "nodes");
  for (int64_t i = 0; i < m; ++i) {
    if (flags[i] & ~kUserFlagsMask)
      throw InvalidValueError(item("flags", i) + " = " + std::to_string(flags[i]) +
                              " sets a reserved bit (user bits are 0xF0; use set_terminal)");
  }
  parallel(m, kGrainGetter, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint32_t n = static_cast<uint32_t>(nodes[i]);
      chunk(n).links[n & kChunkMask].flags.fetch_or(flags[i], std::memory_order_relaxed);
    }
  });
}

// The grain for a call that stores one value per node: a node named twice must end with its
// last value at any batch size, which only one thread storing in order guarantees.
static int64_t store_grain(const NodeId* nodes, int64_t m, int64_t grain) {
  if (m < 2 * grain) return grain;  // one thread anyway
  std::vector<NodeId> sorted(nodes, nodes + m);
  std::sort(sorted.begin(), sorted.end());
  return std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end() ? grain : m;
}

void Forest::set_priors(const NodeId* nodes, const float* priors, int64_t m) {
  check_ids(nodes, m, "nodes");
  for (int64_t i = 0; i < m; ++i) {
    if (!std::isfinite(priors[i]) || priors[i] < 0)
      throw InvalidValueError(item("priors", i) + " must be finite and >= 0");
  }
  parallel(m, store_grain(nodes, m, kGrainGetter), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint32_t n = static_cast<uint32_t>(nodes[i]);
      chunk(n).prior[n & kChunkMask].store(priors[i], std::memory_order_relaxed);
    }
  });
}

// ---- getters ----------------------------------------------------------------------------------

#define RSTAR_GETTER(NAME, TYPE, EXPR)                                                  \
  void Forest::NAME(const NodeId* nodes, int64_t m, TYPE* out) const {                   \
    check_ids(nodes, m, "nodes");                                                        \
    parallel(m, kGrainGetter, [&](int64_t b, int64_t e) {                                \
      for (int64_t k = b; k < e; ++k) {                                                  \
        const uint32_t n = static_cast<uint32_t>(nodes[k]);                              \
        const NodeChunk& c = chunk(n);                                                   \
        const uint32_t i = n & kChunkMask;                                               \
        out[k] = (EXPR);                                                                 \
      }                                                                                  \
    });                                                                                  \
  }

RSTAR_GETTER(visits, int64_t, NodeStats::visits_of(c.stats[i].load()))
RSTAR_GETTER(value_sum, double, c.stats[i].value_sum.load(std::memory_order_relaxed))
RSTAR_GETTER(q, float, ([&] {
               const uint32_t v = NodeStats::visits_of(c.stats[i].load());
               return v == 0 ? 0.0f
                             : static_cast<float>(c.stats[i].value_sum.load(std::memory_order_relaxed) / v);
             }()))
RSTAR_GETTER(in_flight, int32_t, NodeStats::in_flight_of(c.stats[i].load()))
RSTAR_GETTER(first_value, float, c.first_value[i].load(std::memory_order_relaxed))
RSTAR_GETTER(priors, float, c.prior[i].load(std::memory_order_relaxed))
RSTAR_GETTER(flags, uint8_t, c.links[i].flags.load(std::memory_order_relaxed))
RSTAR_GETTER(is_terminal, uint8_t,
             static_cast<uint8_t>((c.links[i].flags.load(std::memory_order_relaxed) & kFlagTerminal) != 0))
RSTAR_GETTER(state, uint8_t, c.links[i].state.load(std::memory_order_acquire))
RSTAR_GETTER(parent, NodeId, c.links[i].parent == kNone32 ? kNoParent : static_cast<NodeId>(c.links[i].parent))
RSTAR_GETTER(depth, int32_t, static_cast<int32_t>(c.depth[i]))
RSTAR_GETTER(num_children, int32_t,
             c.links[i].state.load(std::memory_order_acquire) == kExpanded ? static_cast<int32_t>(c.links[i].child_count) : 0)
RSTAR_GETTER(root_of, NodeId, ([&] {
               uint32_t r = n;
               for (uint32_t p = c.links[i].parent; p != kNone32; p = chunk(p).links[p & kChunkMask].parent) r = p;
               return static_cast<NodeId>(r);
             }()))
#undef RSTAR_GETTER

std::vector<NodeId> Forest::children(NodeId node) const {
  check_ids(&node, 1, "node");
  const uint32_t n = static_cast<uint32_t>(node);
  const NodeChunk& c = chunk(n);
  std::vector<NodeId> out;
  if (c.links[n & kChunkMask].state.load(std::memory_order_acquire) != kExpanded) return out;
  const uint32_t first = c.links[n & kChunkMask].first_child;
  out.resize(c.links[n & kChunkMask].child_count);
  for (size_t k = 0; k < out.size(); ++k) out[k] = static_cast<NodeId>(first) + static_cast<NodeId>(k);
  return out;
}

TreeExport Forest::export_tree(NodeId root) const {
  check_ids(&root, 1, "root");
  TreeExport t;
  t.ids.push_back(root);
  for (size_t head = 0; head < t.ids.size(); ++head) {
    const uint32_t n = static_cast<uint32_t>(t.ids[head]);
    const NodeChunk& c = chunk(n);
    const uint32_t i = n & kChunkMask;
    const bool expanded = c.links[i].state.load(std::memory_order_acquire) == kExpanded;
    const uint32_t count = expanded ? c.links[i].child_count : 0;
    const uint64_t counts = c.stats[i].load();
    const uint32_t visits = NodeStats::visits_of(counts);
    const double sum = c.stats[i].value_sum.load(std::memory_order_relaxed);
    t.parents.push_back(head == 0 || c.links[i].parent == kNone32 ? kNoParent : static_cast<NodeId>(c.links[i].parent));
    t.depth.push_back(c.depth[i]);
    t.num_children.push_back(static_cast<int32_t>(count));
    t.in_flight.push_back(NodeStats::in_flight_of(counts));
    t.visits.push_back(visits);
    t.value_sum.push_back(sum);
    t.q.push_back(visits == 0 ? 0.0f : static_cast<float>(sum / visits));
    t.first_value.push_back(c.first_value[i].load(std::memory_order_relaxed));
    t.prior.push_back(c.prior[i].load(std::memory_order_relaxed));
    t.flags.push_back(c.links[i].flags.load(std::memory_order_relaxed));
    t.state.push_back(c.links[i].state.load(std::memory_order_relaxed));
    for (uint32_t k = 0; k < count; ++k) t.ids.push_back(static_cast<NodeId>(c.links[i].first_child + k));
  }
  return t;
}

// ---- payloads ---------------------------------------------------------------------------------

std::vector<int64_t> Forest::payload_bytes(const char* what, const int64_t* lens, int64_t m,
                                           int64_t item_size) {
  std::vector<int64_t> bytes(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    if (lens[i] < 0) throw InvalidValueError(item(what, i) + " has a negative length");
    if (static_cast<uint64_t>(lens[i]) > SpanArena::kMaxSpan / static_cast<uint64_t>(item_size))
      throw InvalidValueError(item(what, i) + " is " + std::to_string(lens[i]) +
                              (item_size == 1 ? " bytes" : " items of " + std::to_string(item_size) + " bytes") +
                              "; one payload holds at most " + std::to_string(SpanArena::kMaxSpan) + " bytes");
    bytes[i] = lens[i] * item_size;
  }
  return bytes;
}

void Forest::check_token_ids(const char* what, const int32_t* const* ptrs, const int64_t* lens, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t t = 0; t < lens[i]; ++t) {
      if (ptrs[i][t] < 0)
        throw InvalidValueError(item(what, i) + " holds the token id " + std::to_string(ptrs[i][t]) +
                                " (token ids are >= 0)");
    }
  }
}

void Forest::set_payloads(SpanArena& arena, bool tokens, const NodeId* nodes, int64_t m,
                          const void* const* ptrs, const int64_t* byte_lens) {
  std::vector<uint64_t> refs(static_cast<size_t>(m));
  arena.reserve(byte_lens, m, refs.data());
  parallel(m, store_grain(nodes, m, kGrainPayload), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (byte_lens[i] > 0) std::memcpy(arena.data(refs[i]), ptrs[i], static_cast<size_t>(byte_lens[i]));
      const uint32_t n = static_cast<uint32_t>(nodes[i]);
      NodeChunk& c = chunk(n);
      (tokens ? c.token_ref : c.text_ref)[n & kChunkMask].store(refs[i], std::memory_order_release);
    }
  });
}

void Forest::set_texts(const NodeId* nodes, int64_t m, const char* const* ptrs, const int64_t* lens) {
  check_ids(nodes, m, "nodes");
  const std::vector<int64_t> bytes = payload_bytes("texts", lens, m, 1);
  std::vector<const void*> p(ptrs, ptrs + m);
  set_payloads(*text_arena_, false, nodes, m, p.data(), bytes.data());
}

void Forest::set_tokens(const NodeId* nodes, int64_t m, const int32_t* const* ptrs, const int64_t* lens) {
  check_ids(nodes, m, "nodes");
  const std::vector<int64_t> bytes = payload_bytes("tokens", lens, m, sizeof(int32_t));
  check_token_ids("tokens", ptrs, lens, m);
  std::vector<const void*> p(ptrs, ptrs + m);
  set_payloads(*token_arena_, true, nodes, m, p.data(), bytes.data());
}

// Snapshots the refs first (a concurrent setter may replace a payload), then sizes, then copies.
template <typename T>
Ragged<T> Forest::gather(bool tokens, const NodeId* nodes, int64_t m, bool whole_path) const {
  check_ids(nodes, m, whole_path ? "leaves" : "nodes");
  const SpanArena& arena = tokens ? *token_arena_ : *text_arena_;
  // refs of item i: ref_start[i] .. ref_start[i+1], root first.
  std::vector<int64_t> ref_start(static_cast<size_t>(m) + 1, 0);
  for (int64_t i = 0; i < m; ++i) {
    const uint32_t n = static_cast<uint32_t>(nodes[i]);
    ref_start[i + 1] = ref_start[i] + (whole_path ? chunk(n).depth[n & kChunkMask] + 1 : 1);
  }
  std::vector<uint64_t> refs(static_cast<size_t>(ref_start[m]));
  Ragged<T> out;
  out.offsets.assign(static_cast<size_t>(m) + 1, 0);
  parallel(m, kGrainPayload, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      uint32_t n = static_cast<uint32_t>(nodes[i]);
      int64_t bytes = 0;
      for (int64_t r = ref_start[i + 1] - 1; r >= ref_start[i]; --r) {
        const NodeChunk& c = chunk(n);
        refs[r] = (tokens ? c.token_ref : c.text_ref)[n & kChunkMask].load(std::memory_order_acquire);
        bytes += static_cast<int64_t>(SpanArena::length(refs[r]));
        n = c.links[n & kChunkMask].parent;
      }
      out.offsets[i + 1] = bytes / static_cast<int64_t>(sizeof(T));
    }
  });
  for (int64_t i = 0; i < m; ++i) out.offsets[i + 1] += out.offsets[i];
  out.data.resize(static_cast<size_t>(out.offsets[m]));
  parallel(m, kGrainPayload, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      char* dst = reinterpret_cast<char*>(out.data.data() + out.offsets[i]);
      for (int64_t r = ref_start[i]; r < ref_start[i + 1]; ++r) {
        const uint64_t len = SpanArena::length(refs[r]);
        if (len == 0) continue;
        std::memcpy(dst, arena.data(refs[r]), len);
        dst += len;
      }
    }
  });
  return out;
}

Ragged<char> Forest::texts(const NodeId* nodes, int64_t m) const { return gather<char>(false, nodes, m, false); }
Ragged<int32_t> Forest::tokens(const NodeId* nodes, int64_t m) const { return gather<int32_t>(true, nodes, m, false); }
Ragged<char> Forest::path_texts(const NodeId* leaves, int64_t m) const { return gather<char>(false, leaves, m, true); }
Ragged<int32_t> Forest::path_tokens(const NodeId* leaves, int64_t m) const { return gather<int32_t>(true, leaves, m, true); }

}  // namespace rstar
