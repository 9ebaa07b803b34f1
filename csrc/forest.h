// The MCTS forest: thousands of rStar-Math search trees in one struct-of-arrays arena.
//
// Semantics (rStar-Math's selection and values; python_tests/reference_mcts.py is the same in
// pure Python and the golden test holds the two together):
//  * select descends from a root. At an expanded node it scores every non-terminal child and
//    takes the first best one (ties to the first child). A node that is not expanded (fresh, or
//    being expanded by another caller) is the leaf. An expanded node whose children are all
//    terminal becomes terminal (flags kFlagTerminal | kFlagDeadEnd) and the select returns
//    kNoNode; so does a select from a terminal root.
//  * UCT (default): score = Q + c * sqrt(ln N_parent / N_child), the exploration term 0 when
//    either count is 0, Q = value_sum / visits (0 when unvisited).
//    PUCT (option): score = Q + c * prior * sqrt(N_parent) / (1 + N_child), prior 1 by default.
//  * Virtual loss. Every select puts one pending visit on each node of its path (in_flight)
//    and marks the leaf (leaf_pending) until one backprop or cancel ends that simulation. With
//    virtual_loss = v > 0 the scores count each pending visit as a visit of value -v:
//        N = visits + in_flight,  Q = (value_sum - v * in_flight) / N,
//    for the child and (N only) for the parent. With v = 0 virtual loss is off: pending visits
//    are still tracked (in_flight) but ignored by the scores, so one thread makes exactly the
//    reference's choices whatever is in flight.
//  * Values: expand's non-NaN value is the child's first value and one visit (a PPM score);
//    backprop adds reward + one visit from a node to its root; update_local adds value + one
//    visit to the node alone (a failed step's -1); update_path is backprop without ending a
//    simulation. A node's first value is the value of the first update that reached it (as the
//    reference's `inited`), NaN until then.
//
// Concurrency: every method may be called from several threads at once. Statistics are
// atomics; expansion is claimed by a compare-and-swap on the state (fresh -> expanding ->
// expanded, forward only); terminal is a flag that is only ever set. There is no lock on
// select, expand, backprop or cancel. Three small mutexes serialize allocation: the node
// arena's chunk mutex, taken once per batch call that needs a new chunk, and one per payload
// arena (texts, tokens), taken once per batch call that stores payloads. A batch call validates
// all of its input before it mutates anything, so a bad call leaves the forest unchanged.
// The structural calls (add_trees, expand) hold a shared lock that save() takes exclusively, so a
// save reads whole trees (each node with all of its children, or none) whatever runs meanwhile;
// its statistics are those of some moment during the save. export_tree() follows only children
// already published and needs no lock.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "errors.h"

namespace rstar {

class ThreadPool;

// Public node id (numpy int64). Ids are dense: 0 .. num_nodes()-1 in creation order.
using NodeId = int64_t;
// "No node": what select returns when a tree has nothing to select; the parent of a root.
inline constexpr NodeId kNoNode = -1;
inline constexpr NodeId kNoParent = kNoNode;

// Node flag bits. The core sets bits 0-3; bits 4-7 are free for the caller (set_flags).
inline constexpr uint8_t kFlagTerminal = 1u << 0;  // never selected, never expanded
inline constexpr uint8_t kFlagTooDeep = 1u << 1;   // created deeper than max_depth (terminal)
inline constexpr uint8_t kFlagDeadEnd = 1u << 2;   // all children terminal, or expanded with none
inline constexpr uint8_t kFlagValued = 1u << 3;    // has a first value (some update reached it)
inline constexpr uint8_t kUserFlagsMask = 0xF0;

// Expansion state machine, forward only: fresh -> expanding (claimed by CAS) -> expanded.
enum NodeState : uint8_t { kFresh = 0, kExpanding = 1, kExpanded = 2 };

enum class Rule : uint8_t { kUct = 0, kPuct = 1 };

struct ForestOptions {
  double c_uct = 2.0;          // exploration constant c
  int max_depth = 16;          // children deeper than this are created terminal (root: depth 0)
  double virtual_loss = 1.0;   // value of a pending visit is -virtual_loss; 0 turns it off
  int num_threads = 0;         // threads per batch call, caller included; 0: all cores
  Rule rule = Rule::kUct;
};

// Concatenated variable-length payloads of a batch: item i is data[offsets[i], offsets[i+1]).
template <typename T>
struct Ragged {
  std::vector<T> data;
  std::vector<int64_t> offsets;
};

// Optional per-child data of one expand call, one entry per child (num_values of them) where
// given; a null pointer means "not given". All of it is written before the children are
// published, so a concurrent select never sees a child without its payloads or terminal flag.
struct ExpandPayloads {
  const char* const* text_ptrs = nullptr;     // child j's text: text_ptrs[j][0 .. text_lens[j])
  const int64_t* text_lens = nullptr;         // bytes
  const int32_t* const* token_ptrs = nullptr; // child j's token ids: token_ptrs[j][0 .. token_lens[j])
  const int64_t* token_lens = nullptr;        // token ids (each >= 0)
  const uint8_t* terminal = nullptr;          // nonzero: child j is created terminal
};

// One tree as arrays, in breadth-first order from the root (children in creation order).
struct TreeExport {
  std::vector<NodeId> ids, parents;  // parents[0] == kNoParent
  std::vector<int32_t> depth, num_children, in_flight;
  std::vector<int64_t> visits;
  std::vector<double> value_sum;
  std::vector<float> q, first_value, prior;
  std::vector<uint8_t> flags, state;
};

namespace detail {
struct NodeChunk;
class SpanArena;
}  // namespace detail

class Forest {
 public:
  explicit Forest(const ForestOptions& options);
  ~Forest();
  Forest(const Forest&) = delete;
  Forest& operator=(const Forest&) = delete;

  const ForestOptions& options() const { return options_; }
  int num_threads() const;
  int64_t num_nodes() const { return static_cast<int64_t>(reserved_.load(std::memory_order_acquire)); }
  int64_t num_trees() const { return num_trees_.load(std::memory_order_relaxed); }
  // Bytes of node storage per node, payload arenas excluded (held <= 64 by a static_assert).
  static size_t bytes_per_node();
  // Most nodes a forest can hold (ids are 32 bits inside).
  static int64_t max_nodes();

  // ---- search -------------------------------------------------------------------------------
  // n new roots; InvalidValueError naming n when the forest has no room for them. A failed
  // allocation (std::bad_alloc) leaves the forest as it was; so it does for expand.
  void add_trees(int64_t n, NodeId* out);
  // The check add_trees makes first (InvalidValueError naming n), for a caller that allocates
  // the output itself.
  void check_add_trees(int64_t n) const;
  // One leaf per root (kNoNode where nothing is selectable), virtual loss on each path.
  void select(const NodeId* roots, int64_t k, NodeId* out);
  // Continues the simulations that hold leaves[i] (each selected, then expanded) below it, as
  // the reference's rollout does: descends to the next leaf by the same rule, moving the
  // simulation's end and virtual loss down to it. kNoNode where every child is terminal (the
  // simulation still ends at leaves[i]); leaves[i] itself while it is not expanded.
  // Each leaf must hold a pending simulation, which the call claims (as backprop does) before it
  // moves anything: NodeStateError, and nothing changed, where one holds none (any more); a leaf
  // given twice needs two.
  void descend(const NodeId* leaves, int64_t k, NodeId* out);
  // Creates counts[i] children under leaves[i] (values[j]: NaN = unvisited, else first value
  // and one visit). Returns the sum of counts; out receives the children's ids in order.
  int64_t expand(const NodeId* leaves, const int64_t* counts, int64_t k, const float* values,
                 int64_t num_values, NodeId* out);
  // The same, with the children's payloads and terminal flags written before they are published
  // (the payloads are checked, as set_texts / set_tokens check them, before anything changes).
  int64_t expand(const NodeId* leaves, const int64_t* counts, int64_t k, const float* values,
                 int64_t num_values, NodeId* out, const ExpandPayloads& payloads);
  // Adds rewards[i] and one visit from nodes[i] up to its root and ends one simulation: the
  // one whose leaf is leaves[i] when given (it must be nodes[i] or an ancestor), else the
  // pending select whose leaf is nodes[i], else the one whose leaf is its parent.
  void backprop(const NodeId* nodes, const float* rewards, int64_t m, const NodeId* leaves);
  // Ends one simulation per leaf without adding anything (same leaf rule as backprop).
  void cancel(const NodeId* leaves, int64_t m);
  void update_local(const NodeId* nodes, const float* values, int64_t m);
  void update_path(const NodeId* nodes, const float* values, int64_t m);
  void set_terminal(const NodeId* nodes, int64_t m);
  void set_flags(const NodeId* nodes, const uint8_t* flags, int64_t m);  // ORs user bits in
  void set_priors(const NodeId* nodes, const float* priors, int64_t m);

  // ---- batch getters ------------------------------------------------------------------------
  void visits(const NodeId* nodes, int64_t m, int64_t* out) const;
  void q(const NodeId* nodes, int64_t m, float* out) const;
  void value_sum(const NodeId* nodes, int64_t m, double* out) const;
  void in_flight(const NodeId* nodes, int64_t m, int32_t* out) const;
  void first_value(const NodeId* nodes, int64_t m, float* out) const;
  void priors(const NodeId* nodes, int64_t m, float* out) const;
  void flags(const NodeId* nodes, int64_t m, uint8_t* out) const;
  void is_terminal(const NodeId* nodes, int64_t m, uint8_t* out) const;
  void state(const NodeId* nodes, int64_t m, uint8_t* out) const;
  void parent(const NodeId* nodes, int64_t m, NodeId* out) const;
  void depth(const NodeId* nodes, int64_t m, int32_t* out) const;
  void num_children(const NodeId* nodes, int64_t m, int32_t* out) const;
  void root_of(const NodeId* nodes, int64_t m, NodeId* out) const;
  std::vector<NodeId> children(NodeId node) const;
  TreeExport export_tree(NodeId root) const;

  // ---- payloads -----------------------------------------------------------------------------
  // Item i is ptrs[i][0 .. lens[i]). Setting a payload again replaces it. Token ids are >= 0.
  void set_texts(const NodeId* nodes, int64_t m, const char* const* ptrs, const int64_t* lens);
  void set_tokens(const NodeId* nodes, int64_t m, const int32_t* const* ptrs, const int64_t* lens);
  Ragged<char> texts(const NodeId* nodes, int64_t m) const;
  Ragged<int32_t> tokens(const NodeId* nodes, int64_t m) const;
  // Root-to-leaf concatenation of the payloads of each node's path (the root's is the prompt).
  Ragged<char> path_texts(const NodeId* leaves, int64_t m) const;
  Ragged<int32_t> path_tokens(const NodeId* leaves, int64_t m) const;

  // ---- persistence --------------------------------------------------------------------------
  // Versioned, checksummed file; written to path + ".tmp" and renamed. Pending simulations
  // are not saved: a loaded forest has nothing in flight and no node being expanded.
  // A path with a NUL byte is InvalidValueError (it would name another file); so is a negative
  // num_threads, checked before the file is read.
  void save(const std::string& path) const;
  static std::unique_ptr<Forest> load(const std::string& path, int num_threads);

 private:
  struct Ref;
  void check_ids(const NodeId* ids, int64_t m, const char* what) const;
  bool exists(NodeId id) const;
  // n contiguous new ids, their chunks allocated before num_nodes covers them.
  uint32_t reserve_nodes(int64_t n);
  void init_node(uint32_t id, uint32_t parent, uint32_t depth, float value, uint8_t flags);
  template <bool kVirtualLoss, bool kPuct>
  void select_range(const NodeId* roots, int64_t begin, int64_t end, NodeId* out, bool from_leaf);
  void run_select(const NodeId* starts, int64_t k, NodeId* out, bool from_leaf);
  void end_simulations(const NodeId* nodes, int64_t m, const NodeId* leaves, const char* what,
                       std::vector<uint32_t>& ends);
  // Adds value to the node's sum and delta to its counts (a visit, maybe minus a pending one).
  void add_value(uint32_t node, double value, uint64_t delta);
  void set_payloads(detail::SpanArena& arena, bool tokens, const NodeId* nodes, int64_t m,
                    const void* const* ptrs, const int64_t* byte_lens);
  // Byte sizes of m payloads of item_size-byte items, each checked against the span limit
  // (InvalidValueError naming what[i]); token ids are checked to be >= 0.
  static std::vector<int64_t> payload_bytes(const char* what, const int64_t* lens, int64_t m,
                                            int64_t item_size);
  static void check_token_ids(const char* what, const int32_t* const* ptrs, const int64_t* lens,
                              int64_t m);
  template <typename T>
  Ragged<T> gather(bool tokens, const NodeId* nodes, int64_t m, bool whole_path) const;
  template <typename F>
  void parallel(int64_t n, int64_t grain, F&& fn) const;

  detail::NodeChunk& chunk(uint32_t id) const;
  static int current_pid();

  ForestOptions options_;
  std::unique_ptr<ThreadPool> pool_;
  // Chunk table, preallocated: entry c holds nodes [c * kChunkNodes, (c+1) * kChunkNodes).
  // Entries go from null to a chunk once (release store under chunk_mutex_) and never move.
  std::unique_ptr<std::atomic<detail::NodeChunk*>[]> chunks_;
  std::mutex chunk_mutex_;               // serializes chunk allocation only
  // add_trees and expand hold it shared (they never wait on each other), save exclusively while
  // it reads the node states: a save never sees a node whose children are being made. A forked
  // child makes a new one on its first call (the parent's may be held by a thread the fork did
  // not copy); a Forest's copy in a fork is used from one thread.
  std::shared_mutex& structure_mutex() const;
  mutable std::unique_ptr<std::shared_mutex> structure_mutex_ = std::make_unique<std::shared_mutex>();
  mutable int structure_pid_ = current_pid();
  std::atomic<uint64_t> reserved_{0};    // ids handed out so far (num_nodes)
  std::atomic<int64_t> num_trees_{0};
  std::unique_ptr<detail::SpanArena> text_arena_, token_arena_;
};

}  // namespace rstar
