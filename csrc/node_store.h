// Storage of the forest (internal to the core): node chunks in struct-of-arrays layout and the
// append-only span arenas that hold payloads (step texts and token ids).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>

#include "errors.h"
#include "forest.h"

namespace rstar::detail {

// Internal node index. Public ids are int64; inside, 32 bits keep the node small.
inline constexpr uint32_t kNone32 = 0xFFFFFFFFu;  // "no node" / parent of a root
inline constexpr uint32_t kChunkShift = 16;
inline constexpr uint32_t kChunkNodes = 1u << kChunkShift;  // nodes per chunk
inline constexpr uint32_t kChunkMask = kChunkNodes - 1;
inline constexpr uint32_t kMaxNodeChunks = 1u << (32 - kChunkShift);
inline constexpr uint64_t kMaxNodes = uint64_t{kChunkNodes} * kMaxNodeChunks - 1;  // kNone32 unused
inline constexpr uint32_t kMaxChildren = 0xFFFF;  // per expand of one node (child_count is 16 bits)
inline constexpr uint32_t kMaxDepth = 0xFFFE;     // depth is 16 bits
inline const float kNaN = std::numeric_limits<float>::quiet_NaN();

// The fields a descent reads at every step, packed so that a node costs one cache-line access
// and 8 siblings two. Contract letters as in NodeChunk below.
struct NodeLinks {
  uint32_t parent;             // (a) parent's id; kNone32 for a root; always < the node's id
  uint32_t first_child;        // (b) id of the first child (one expand makes all children, contiguous);
                               //     kNone32 before, and 0 only in a reserved node not yet created
                               //     (stored with atomic_ref: Forest::exists reads it at any time)
  // (c) Selects in flight whose leaf is this node. A backprop/cancel claims one by a
  //     decrement-if-positive CAS before it touches anything, so it never goes negative.
  std::atomic<uint32_t> leaf_pending;
  uint16_t child_count;        // (b) number of children (0 until expanded)
  std::atomic<uint8_t> state;  // (c) NodeState: CAS kFresh -> kExpanding claims an expansion; the
                               //     claimer's release store of kExpanded publishes the children
  std::atomic<uint8_t> flags;  // (c) kFlag* bits, set by fetch_or and never cleared
};
static_assert(sizeof(NodeLinks) == 16, "NodeLinks is a quarter cache line");

// Visit statistics, read for every child a descent scores. All relaxed atomics: visits and
// value_sum are not read as a joint snapshot, so a concurrent reader may see one updated and not
// the other (a transient, bounded error in one score).
struct NodeStats {
  std::atomic<double> value_sum;  // sum of the values the visits brought
  // Two counters in one word, so that a backprop adds a visit and removes a pending one with a
  // single atomic add, and a reader sees both at once:
  //  low 32 bits: visits, completed visits (backprops through it, scored expand, local updates);
  //  high 32 bits: in_flight (two's complement), pending selects whose path contains the node:
  //  + kPending by select once it picked its leaf, - kPending by the backprop/cancel ending it.
  std::atomic<uint64_t> counts;

  static constexpr uint64_t kVisit = 1;
  // visits saturate here (a visit past it is not counted), 256 short of carrying into in_flight
  static constexpr uint32_t kMaxVisits = 0xFFFFFF00u;
  static constexpr uint64_t kPending = uint64_t{1} << 32;
  static uint32_t visits_of(uint64_t counts) { return static_cast<uint32_t>(counts); }
  static int32_t in_flight_of(uint64_t counts) { return static_cast<int32_t>(static_cast<uint32_t>(counts >> 32)); }
  uint64_t load() const { return counts.load(std::memory_order_relaxed); }
};
static_assert(sizeof(NodeStats) == 16, "NodeStats is a quarter cache line");

// kChunkNodes nodes, struct-of-arrays: one array per record or field. A chunk comes zeroed from
// the OS (huge pages where available) and never moves or shrinks, so a thread may read a node
// while another thread appends nodes elsewhere.
//
// Concurrency contract per field, in three groups:
//  (a) structure, written once by the call that creates the node, before the id is published
//      (returned to the caller, or made reachable by the parent's release store of kExpanded);
//      read-only afterwards. The chunk itself exists before num_nodes covers the id (a chunk is
//      allocated before the ids in it are reserved), so an id below num_nodes always has one;
//      a node reserved but not yet created reads as zeros;
//  (b) children, written once by the expand that won the CAS fresh -> expanding, before its
//      release store of kExpanded; read only after an acquire load of state sees kExpanded;
//  (c) atomics, updated by any thread at any time.
struct NodeChunk {
  NodeLinks links[kChunkNodes];
  NodeStats stats[kChunkNodes];
  // (a) Depth: 0 for a root, parent's + 1 otherwise (read by expand and the path gathers only).
  uint16_t depth[kChunkNodes];
  // (c) Value of the first update that reached the node (NaN until then). Set once by CAS
  //     from the canonical NaN; kFlagValued is set after it.
  std::atomic<float> first_value[kChunkNodes];
  // (c) PUCT prior, 1 unless set. Relaxed.
  std::atomic<float> prior[kChunkNodes];
  // (c) Payload spans (SpanArena refs; 0 = empty). The bytes are written before the release
  //     store of the ref; readers load it with acquire. Replacing a payload appends a new span.
  std::atomic<uint64_t> text_ref[kChunkNodes];
  std::atomic<uint64_t> token_ref[kChunkNodes];
};

inline constexpr size_t kBytesPerNode = sizeof(NodeChunk) / kChunkNodes;
static_assert(sizeof(NodeChunk) % kChunkNodes == 0, "no padding between the field arrays");
static_assert(kBytesPerNode <= 64, "a node must stay within 64 bytes (payload excluded)");
static_assert(std::atomic<double>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "node statistics must be lock-free atomics");

// Chunk memory straight from the OS: zeroed (every field, atomics included, starts at 0),
// 2 MiB aligned and advised to use transparent huge pages, which cuts page faults and TLB misses
// of the random accesses a forest of thousands of trees makes.
NodeChunk* allocate_chunk();
void free_chunk(NodeChunk* chunk);

}  // namespace rstar::detail

namespace rstar {

// Inline: every node access goes through it.
inline detail::NodeChunk& Forest::chunk(uint32_t id) const {
  return *chunks_[id >> detail::kChunkShift].load(std::memory_order_acquire);
}

}  // namespace rstar

namespace rstar::detail {

// Append-only storage for variable-length payloads in 16 MiB chunks that never move. A ref
// packs (chunk:16 | offset:24 | length:24) into 64 bits, 0 meaning the empty span; one span is
// at most 16 MiB - 1 bytes. Room is handed out under a mutex, once per batch call (the only
// lock a payload setter takes); the bytes are copied outside it.
class SpanArena {
 public:
  static constexpr int kLenBits = 24, kOffsetBits = 24, kChunkBits = 16;
  static constexpr uint64_t kChunkBytes = uint64_t{1} << kOffsetBits;
  static constexpr uint64_t kMaxSpan = (uint64_t{1} << kLenBits) - 1;
  static constexpr uint32_t kMaxChunks = 1u << kChunkBits;

  SpanArena() : chunks_(new std::atomic<char*>[kMaxChunks]()) {}
  ~SpanArena() {
    for (uint32_t c = 0; c < kMaxChunks; ++c) delete[] chunks_[c].load(std::memory_order_relaxed);
  }
  SpanArena(const SpanArena&) = delete;
  SpanArena& operator=(const SpanArena&) = delete;

  static uint64_t length(uint64_t ref) { return ref & kMaxSpan; }
  char* data(uint64_t ref) const {
    const uint64_t chunk = ref >> (kLenBits + kOffsetBits);
    const uint64_t offset = (ref >> kLenBits) & ((uint64_t{1} << kOffsetBits) - 1);
    return chunks_[chunk].load(std::memory_order_acquire) + offset;
  }

  // Places m spans of sizes[i] bytes (each <= kMaxSpan, 4-byte aligned) and writes their refs.
  void reserve(const int64_t* sizes, int64_t m, uint64_t* refs) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (int64_t i = 0; i < m; ++i) {
      const uint64_t size = static_cast<uint64_t>(sizes[i]);
      if (size == 0) {
        refs[i] = 0;
        continue;
      }
      RSTAR_CHECK(size <= kMaxSpan);
      uint64_t offset = (cursor_ + 3) & ~uint64_t{3};
      if (chunk_ == kNoChunk || offset + size > kChunkBytes) {
        const uint32_t next = chunk_ == kNoChunk ? 0 : chunk_ + 1;
        if (next >= kMaxChunks) throw InvalidValueError("payload arena is full (1 TiB)");
        chunks_[next].store(new char[kChunkBytes], std::memory_order_release);
        chunk_ = next;
        offset = 0;
      }
      cursor_ = offset + size;
      refs[i] = (uint64_t{chunk_} << (kLenBits + kOffsetBits)) | (offset << kLenBits) | size;
    }
  }

 private:
  static constexpr uint32_t kNoChunk = 0xFFFFFFFFu;
  std::unique_ptr<std::atomic<char*>[]> chunks_;  // preallocated table; entries set once
  std::mutex mutex_;                              // guards chunk_ and cursor_
  uint32_t chunk_ = kNoChunk;                     // chunk being filled
  uint64_t cursor_ = 0;                           // first free byte in it
};

}  // namespace rstar::detail
