// Forest::save / Forest::load: one versioned, checksummed binary file.
//
// Layout (little-endian, as the host; version 1):
//   header   magic "RSTRFRST", u32 version, u32 header bytes, f64 c_uct, f64 virtual_loss,
//            i32 max_depth, u8 rule, 3 pad bytes, u64 num_nodes, u64 text bytes, u64 tokens
//   nodes    one array per field, num_nodes entries each: u32 parent, u16 depth,
//            u32 first_child, u16 child_count, u8 state, u8 flags, u32 visits, f64 value_sum,
//            f32 first_value, f32 prior, u32 text length (bytes), u32 token count
//   payload  all texts, then all token ids (i32), in node order
//   trailer  u64 checksum of every byte before it
// Pending simulations (in_flight, leaf_pending) are not saved. The node states are read while no
// add_trees or expand runs, so every saved node comes with all of its children. The loader checks sizes, checksum and the tree structure before building anything, so
// a bad file raises CorruptFileError and never crashes.
#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "forest.h"
#include "node_store.h"

namespace rstar {

using detail::kChunkMask;
using detail::kNone32;
using detail::NodeChunk;
using detail::SpanArena;

namespace {

constexpr char kMagic[8] = {'R', 'S', 'T', 'R', 'F', 'R', 'S', 'T'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 8 + 4 + 4 + 8 + 8 + 4 + 1 + 3 + 8 + 8 + 8;
// Bytes per node in the file (the per-node arrays above).
constexpr size_t kFileBytesPerNode = 4 + 2 + 4 + 2 + 1 + 1 + 4 + 8 + 4 + 4 + 4 + 4;
constexpr int kFifoWaitMs = 10000;  // how long load() waits for a FIFO's writer

// Word-wise FNV-style hash: every step is a bijection of the state for a fixed input word, so
// any single changed word changes the result.
uint64_t checksum(const char* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 0x100000001b3ull;
  return h ^ n;
}

class Writer {
 public:
  template <typename T>
  void put(const T& v) {
    const size_t at = buf.size();
    buf.resize(at + sizeof(T));
    std::memcpy(buf.data() + at, &v, sizeof(T));
  }
  void put_bytes(const void* p, size_t n) {
    const size_t at = buf.size();
    buf.resize(at + n);
    if (n > 0) std::memcpy(buf.data() + at, p, n);
  }
  std::string buf;
};

class Reader {
 public:
  Reader(const char* p, size_t n) : p_(p), n_(n) {}
  template <typename T>
  T get() {
    RSTAR_CHECK(at_ + sizeof(T) <= n_);  // sizes were checked against the header before
    T v;
    std::memcpy(&v, p_ + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  const char* take(size_t n) {
    RSTAR_CHECK(at_ + n <= n_);
    const char* q = p_ + at_;
    at_ += n;
    return q;
  }

 private:
  const char* p_;
  size_t n_;
  size_t at_ = 0;
};

// A path is handed to the C library as a C string: an embedded NUL would silently name another
// file (the part before it).
void check_path(const std::string& path, const char* what) {
  const size_t nul = path.find('\0');
  if (nul == std::string::npos) return;
  std::string shown;  // the path with each NUL written \x00 (a message is a C string too)
  for (char ch : path) shown += ch == '\0' ? std::string("\\x00") : std::string(1, ch);
  throw InvalidValueError(std::string(what) + ": path '" + shown + "' contains a NUL byte (at " +
                          std::to_string(nul) + ")");
}

[[noreturn]] void corrupt(const std::string& path, const std::string& why) {
  throw CorruptFileError("cannot load forest from " + path + ": " + why);
}

}  // namespace

void Forest::save(const std::string& path) const {
  check_path(path, "save");
  // The file is written beside the path and renamed over it: a device or a FIFO there would be
  // replaced by a regular file, not written to (a symlink is replaced too; the file it names stays)
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))
    throw IoError("cannot save forest to " + path + ": it exists and is not a regular file", EEXIST, path);
  // No add_trees or expand runs while the states are read (see structure_mutex()): every node
  // read as expanded has its children below n. What the rest of the save reads of nodes below
  // n (links, depths, an expanded node's children) no longer changes.
  std::unique_lock structure(structure_mutex());
  const uint64_t n = static_cast<uint64_t>(num_nodes());
  std::vector<uint64_t> text_refs(n), token_refs(n);
  std::vector<uint8_t> states(n);
  uint64_t text_bytes = 0, token_bytes = 0;
  for (uint64_t id = 0; id < n; ++id) {
    const NodeChunk& c = chunk(static_cast<uint32_t>(id));
    const uint32_t i = static_cast<uint32_t>(id) & kChunkMask;
    text_refs[id] = c.text_ref[i].load(std::memory_order_acquire);
    token_refs[id] = c.token_ref[i].load(std::memory_order_acquire);
    text_bytes += SpanArena::length(text_refs[id]);
    token_bytes += SpanArena::length(token_refs[id]);
    const uint8_t s = c.links[i].state.load(std::memory_order_acquire);
    states[id] = s == kExpanded ? kExpanded : kFresh;
  }
  structure.unlock();
  Writer w;
  w.buf.reserve(kHeaderBytes + n * kFileBytesPerNode + text_bytes + token_bytes + 8);
  w.put_bytes(kMagic, 8);
  w.put<uint32_t>(kVersion);
  w.put<uint32_t>(static_cast<uint32_t>(kHeaderBytes));
  w.put<double>(options_.c_uct);
  w.put<double>(options_.virtual_loss);
  w.put<int32_t>(options_.max_depth);
  w.put<uint8_t>(static_cast<uint8_t>(options_.rule));
  w.put_bytes("\0\0\0", 3);
  w.put<uint64_t>(n);
  w.put<uint64_t>(text_bytes);
  w.put<uint64_t>(token_bytes / sizeof(int32_t));
  auto each = [&](auto&& fn) {
    for (uint64_t id = 0; id < n; ++id) fn(chunk(static_cast<uint32_t>(id)), static_cast<uint32_t>(id) & kChunkMask, id);
  };
  each([&](const NodeChunk& c, uint32_t i, uint64_t) { w.put<uint32_t>(c.links[i].parent); });
  each([&](const NodeChunk& c, uint32_t i, uint64_t) { w.put<uint16_t>(c.depth[i]); });
  each([&](const NodeChunk& c, uint32_t i, uint64_t id) {
    w.put<uint32_t>(states[id] == kExpanded ? c.links[i].first_child : kNone32);
  });
  each([&](const NodeChunk& c, uint32_t i, uint64_t id) {
    w.put<uint16_t>(states[id] == kExpanded ? c.links[i].child_count : uint16_t{0});
  });
  each([&](const NodeChunk&, uint32_t, uint64_t id) { w.put<uint8_t>(states[id]); });
  each([&](const NodeChunk& c, uint32_t i, uint64_t) { w.put<uint8_t>(c.links[i].flags.load(std::memory_order_relaxed)); });
  each([&](const NodeChunk& c, uint32_t i, uint64_t) { w.put<uint32_t>(detail::NodeStats::visits_of(c.stats[i].load())); });
  each([&](const NodeChunk& c, uint32_t i, uint64_t) { w.put<double>(c.stats[i].value_sum.load(std::memory_order_relaxed)); });
  each([&](const NodeChunk& c, uint32_t i, uint64_t) { w.put<float>(c.first_value[i].load(std::memory_order_relaxed)); });
  each([&](const NodeChunk& c, uint32_t i, uint64_t) { w.put<float>(c.prior[i].load(std::memory_order_relaxed)); });
  for (uint64_t id = 0; id < n; ++id) w.put<uint32_t>(static_cast<uint32_t>(SpanArena::length(text_refs[id])));
  for (uint64_t id = 0; id < n; ++id)
    w.put<uint32_t>(static_cast<uint32_t>(SpanArena::length(token_refs[id]) / sizeof(int32_t)));
  for (uint64_t id = 0; id < n; ++id) {
    if (SpanArena::length(text_refs[id]) > 0)
      w.put_bytes(text_arena_->data(text_refs[id]), SpanArena::length(text_refs[id]));
  }
  for (uint64_t id = 0; id < n; ++id) {
    if (SpanArena::length(token_refs[id]) > 0)
      w.put_bytes(token_arena_->data(token_refs[id]), SpanArena::length(token_refs[id]));
  }
  w.put<uint64_t>(checksum(w.buf.data(), w.buf.size()));

  // a name no other save uses, in this process or another: two saves to one path both succeed
  static std::atomic<uint64_t> saves{0};
  const std::string tmp = path + "." + std::to_string(::getpid()) + "." +
                          std::to_string(saves.fetch_add(1, std::memory_order_relaxed)) + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) throw IoError("cannot open " + tmp + " for writing: " + std::strerror(errno), errno, tmp);
  errno = 0;
  const size_t written = std::fwrite(w.buf.data(), 1, w.buf.size(), f);
  int write_errno = written != w.buf.size() ? errno : 0;
  // a small file is only flushed, and a full disk only noticed, by fclose
  if (std::fclose(f) != 0 && write_errno == 0) write_errno = errno;
  if (write_errno != 0 || written != w.buf.size()) {
    if (write_errno == 0) write_errno = EIO;
    std::remove(tmp.c_str());
    throw IoError("cannot write " + tmp + ": " + std::strerror(write_errno), write_errno, tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    throw IoError("cannot rename " + tmp + " to " + path + ": " + std::strerror(e), e, path);
  }
}

std::unique_ptr<Forest> Forest::load(const std::string& path, int num_threads) {
  // The caller's arguments first: a bad num_threads is not the file's fault.
  if (num_threads < 0)
    throw InvalidValueError("load: num_threads must be >= 0 (0: all cores), got " + std::to_string(num_threads));
  check_path(path, "load");
  // Opened without blocking: a FIFO with no writer would otherwise block here for good. A
  // FIFO gets kFifoWaitMs for a writer to connect and send (`producer > fifo &` starts a
  // moment later); then blocking reads are restored, and a pipe reads as usual.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot open " + path + ": " + std::strerror(errno), errno, path);
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode)) {
    pollfd waiting{fd, POLLIN, 0};
    int ready;
    do {
      ready = ::poll(&waiting, 1, kFifoWaitMs);
    } while (ready < 0 && errno == EINTR);
    if (ready == 0) {
      ::close(fd);
      throw IoError("cannot load " + path + ": nothing wrote to this FIFO within " +
                        std::to_string(kFifoWaitMs / 1000) + " s",
                    ETIMEDOUT, path);
    }
  }
  std::FILE* f = nullptr;
  const int fd_flags = ::fcntl(fd, F_GETFL);
  if (fd_flags < 0 || ::fcntl(fd, F_SETFL, fd_flags & ~O_NONBLOCK) < 0 || (f = ::fdopen(fd, "rb")) == nullptr) {
    const int e = errno;
    ::close(fd);
    throw IoError("cannot open " + path + ": " + std::strerror(e), e, path);
  }
  std::string buf;
  char block[1 << 16];
  size_t got;
  errno = 0;
  while ((got = std::fread(block, 1, sizeof(block), f)) > 0) {
    buf.append(block, got);
    // another kind of file (or an endless one, /dev/zero) is refused on its first bytes
    if (buf.size() >= sizeof(kMagic) && std::memcmp(buf.data(), kMagic, sizeof(kMagic)) != 0) break;
  }
  const int read_errno = std::ferror(f) != 0 ? (errno != 0 ? errno : EIO) : 0;
  std::fclose(f);
  if (read_errno != 0)
    throw IoError("cannot read " + path + ": " + std::strerror(read_errno), read_errno, path);

  const size_t size = buf.size();
  if (size < sizeof(kMagic) || std::memcmp(buf.data(), kMagic, sizeof(kMagic)) != 0)
    corrupt(path, size < sizeof(kMagic) ? "truncated (" + std::to_string(size) + " bytes)"
                                        : "not an rstar_fast forest file (bad magic)");
  if (size < kHeaderBytes + 8)
    corrupt(path, "truncated: " + std::to_string(size) + " bytes, the header alone needs " +
                      std::to_string(kHeaderBytes + 8));
  Reader r(buf.data(), size - 8);
  r.take(8);
  const uint32_t version = r.get<uint32_t>();
  if (version != kVersion)
    corrupt(path, "unsupported file version " + std::to_string(version) + " (this build reads version " +
                      std::to_string(kVersion) + ")");
  if (r.get<uint32_t>() != kHeaderBytes) corrupt(path, "bad header size");
  ForestOptions opt;
  opt.c_uct = r.get<double>();
  opt.virtual_loss = r.get<double>();
  opt.max_depth = r.get<int32_t>();
  const uint8_t rule = r.get<uint8_t>();
  r.take(3);
  opt.num_threads = num_threads;
  const uint64_t n = r.get<uint64_t>();
  const uint64_t text_bytes = r.get<uint64_t>();
  const uint64_t token_count = r.get<uint64_t>();
  // Sizes: compare each count with the file size first so the sum cannot overflow.
  if (n > detail::kMaxNodes || text_bytes > size || token_count > size)
    corrupt(path, "truncated or corrupt header (counts larger than the file)");
  const uint64_t expected = kHeaderBytes + n * kFileBytesPerNode + text_bytes + token_count * 4 + 8;
  if (size < expected)
    corrupt(path, "truncated: " + std::to_string(size) + " bytes, expected " + std::to_string(expected));
  if (size > expected)
    corrupt(path, std::to_string(size - expected) + " unexpected bytes after the data");
  uint64_t stored;
  std::memcpy(&stored, buf.data() + size - 8, 8);
  if (stored != checksum(buf.data(), size - 8)) corrupt(path, "checksum mismatch: the file is corrupt");
  if (rule > 1) corrupt(path, "unknown selection rule " + std::to_string(rule));
  opt.rule = static_cast<Rule>(rule);

  std::vector<uint32_t> parent(n), first_child(n), visits(n), text_len(n), token_len(n);
  std::vector<uint16_t> depth(n), child_count(n);
  std::vector<uint8_t> state(n), flags(n);
  std::vector<double> value_sum(n);
  std::vector<float> first_value(n), prior(n);
  for (auto& v : parent) v = r.get<uint32_t>();
  for (auto& v : depth) v = r.get<uint16_t>();
  for (auto& v : first_child) v = r.get<uint32_t>();
  for (auto& v : child_count) v = r.get<uint16_t>();
  for (auto& v : state) v = r.get<uint8_t>();
  for (auto& v : flags) v = r.get<uint8_t>();
  for (auto& v : visits) v = r.get<uint32_t>();
  for (auto& v : value_sum) v = r.get<double>();
  for (auto& v : first_value) v = r.get<float>();
  for (auto& v : prior) v = r.get<float>();
  for (auto& v : text_len) v = r.get<uint32_t>();
  for (auto& v : token_len) v = r.get<uint32_t>();

  // Structure: parents precede children, depths agree, child ranges are inside the forest and
  // point back to their parent, each child lies in its parent's range, payload lengths add up.
  uint64_t text_sum = 0, token_sum = 0;
  int64_t trees = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const std::string at = "node " + std::to_string(i) + ": ";
    if (parent[i] == kNone32) {
      ++trees;
      if (depth[i] != 0) corrupt(path, at + "a root with depth " + std::to_string(depth[i]));
    } else if (parent[i] >= i) {
      corrupt(path, at + "parent " + std::to_string(parent[i]) + " does not precede it");
    } else if (depth[i] != depth[parent[i]] + 1) {
      corrupt(path, at + "depth does not follow its parent's");
    } else {
      // listed by its parent too: else export and select would never reach it, and an expand of
      // a parent saved as fresh would give it a second set of children
      const uint32_t p = parent[i];
      if (state[p] != kExpanded || first_child[p] == kNone32 || i < first_child[p] ||
          i >= uint64_t{first_child[p]} + child_count[p])
        corrupt(path, at + "not among its parent's children");
    }
    if (state[i] != kFresh && state[i] != kExpanded) corrupt(path, at + "bad state " + std::to_string(state[i]));
    if (state[i] == kExpanded && child_count[i] > 0) {
      if (first_child[i] == kNone32 || uint64_t{first_child[i]} + child_count[i] > n)
        corrupt(path, at + "children out of range");
      for (uint32_t k = 0; k < child_count[i]; ++k) {
        if (parent[first_child[i] + k] != i) corrupt(path, at + "a child does not point back to it");
      }
    } else if (child_count[i] != 0) {
      corrupt(path, at + "children on a node that is not expanded");
    }
    if (text_len[i] > SpanArena::kMaxSpan || uint64_t{token_len[i]} * 4 > SpanArena::kMaxSpan)
      corrupt(path, at + "payload too long");
    // values the API never stores: loaded, they would break later updates and selects
    if (!std::isfinite(value_sum[i]) || std::isinf(first_value[i]))
      corrupt(path, at + "a value that is not finite");
    if (!std::isfinite(prior[i]) || prior[i] < 0) corrupt(path, at + "a prior that is not finite and >= 0");
    if (opt.max_depth >= 0 && depth[i] > opt.max_depth && !(flags[i] & kFlagTerminal))
      corrupt(path, at + "deeper than max_depth but not terminal");
    text_sum += text_len[i];
    token_sum += token_len[i];
  }
  if (text_sum != text_bytes || token_sum != token_count)
    corrupt(path, "payload lengths do not add up to the header's totals");

  std::unique_ptr<Forest> forest;
  try {
    forest = std::make_unique<Forest>(opt);
  } catch (const InvalidValueError& e) {
    corrupt(path, std::string("bad options in the header: ") + e.what());
  }
  forest->reserve_nodes(static_cast<int64_t>(n));
  std::vector<int64_t> text_sizes(n), token_sizes(n);
  for (uint64_t i = 0; i < n; ++i) {
    text_sizes[i] = text_len[i];
    token_sizes[i] = int64_t{token_len[i]} * 4;
  }
  std::vector<uint64_t> text_refs(n), token_refs(n);
  forest->text_arena_->reserve(text_sizes.data(), static_cast<int64_t>(n), text_refs.data());
  forest->token_arena_->reserve(token_sizes.data(), static_cast<int64_t>(n), token_refs.data());
  const char* texts = r.take(text_bytes);
  const char* tokens = r.take(token_count * 4);
  for (uint64_t t = 0; t < token_count; ++t) {
    int32_t id;
    std::memcpy(&id, tokens + 4 * t, 4);
    if (id < 0) corrupt(path, "token id " + std::to_string(id) + " (token ids are >= 0)");
  }
  for (uint64_t id = 0; id < n; ++id) {
    NodeChunk& c = forest->chunk(static_cast<uint32_t>(id));
    const uint32_t i = static_cast<uint32_t>(id) & kChunkMask;
    c.links[i].parent = parent[id];
    c.depth[i] = depth[id];
    c.links[i].first_child = state[id] == kExpanded && child_count[id] > 0 ? first_child[id] : kNone32;
    c.links[i].child_count = child_count[id];
    c.links[i].state.store(state[id], std::memory_order_relaxed);
    c.links[i].flags.store(flags[id], std::memory_order_relaxed);
    c.stats[i].counts.store(visits[id], std::memory_order_relaxed);  // nothing in flight
    c.stats[i].value_sum.store(value_sum[id], std::memory_order_relaxed);
    c.links[i].leaf_pending.store(0, std::memory_order_relaxed);
    // Keep "unset" as the canonical NaN so the first update's CAS recognises it.
    c.first_value[i].store(std::isnan(first_value[id]) ? detail::kNaN : first_value[id], std::memory_order_relaxed);
    c.prior[i].store(prior[id], std::memory_order_relaxed);
    if (text_len[id] > 0) {
      std::memcpy(forest->text_arena_->data(text_refs[id]), texts, text_len[id]);
      texts += text_len[id];
    }
    if (token_len[id] > 0) {
      std::memcpy(forest->token_arena_->data(token_refs[id]), tokens, token_sizes[id]);
      tokens += token_sizes[id];
    }
    c.text_ref[i].store(text_refs[id], std::memory_order_release);
    c.token_ref[i].store(token_refs[id], std::memory_order_release);
  }
  forest->num_trees_.store(trees, std::memory_order_relaxed);
  return forest;
}

}  // namespace rstar
