// C++ unit and concurrency tests of the forest core (no framework: a few macros).
// Usage: forest_tests [unit|concurrency|all]. Prints one line per test and a closing summary
// "forest_tests <group>: N passed, M failed"; exits non-zero on any failure. .ci/cpp_tests runs
// both groups plain and under ThreadSanitizer.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "forest.h"
#include "thread_pool.h"

using namespace rstar;

namespace {

struct Failure {
  std::string what;
};

struct Test {
  const char* group;
  const char* name;
  void (*fn)();
};

std::vector<Test>& registry() {
  static std::vector<Test> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* group, const char* name, void (*fn)()) { registry().push_back({group, name, fn}); }
};

#define TEST(group, name)                                      \
  static void test_##name();                                   \
  static Registrar registrar_##name(#group, #name, test_##name); \
  static void test_##name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) throw Failure{std::string(#cond) + " (" __FILE__ ":" + std::to_string(__LINE__) + ")"}; \
  } while (0)

#define CHECK_THROWS(expr, Type)                                                        \
  do {                                                                                  \
    bool thrown = false;                                                                \
    try {                                                                               \
      expr;                                                                             \
    } catch (const Type&) {                                                             \
      thrown = true;                                                                    \
    }                                                                                   \
    if (!thrown) throw Failure{std::string(#expr " did not throw " #Type " (") + __FILE__ ":" + std::to_string(__LINE__) + ")"}; \
  } while (0)

ForestOptions opts(double vl = 0.0, int max_depth = 16, int threads = 1, Rule rule = Rule::kUct) {
  ForestOptions o;
  o.virtual_loss = vl;
  o.max_depth = max_depth;
  o.num_threads = threads;
  o.rule = rule;
  return o;
}

NodeId add_tree(Forest& f) {
  NodeId r;
  f.add_trees(1, &r);
  return r;
}

NodeId select1(Forest& f, NodeId root) {
  NodeId out;
  f.select(&root, 1, &out);
  return out;
}

std::vector<NodeId> expand1(Forest& f, NodeId leaf, std::vector<float> values) {
  const int64_t count = static_cast<int64_t>(values.size());
  std::vector<NodeId> out(values.size());
  f.expand(&leaf, &count, 1, values.data(), count, out.data());
  return out;
}

int64_t visits(const Forest& f, NodeId n) {
  int64_t v;
  f.visits(&n, 1, &v);
  return v;
}
int32_t in_flight(const Forest& f, NodeId n) {
  int32_t v;
  f.in_flight(&n, 1, &v);
  return v;
}
double value_sum(const Forest& f, NodeId n) {
  double v;
  f.value_sum(&n, 1, &v);
  return v;
}
uint8_t flags(const Forest& f, NodeId n) {
  uint8_t v;
  f.flags(&n, 1, &v);
  return v;
}
uint8_t state(const Forest& f, NodeId n) {
  uint8_t v;
  f.state(&n, 1, &v);
  return v;
}

void backprop1(Forest& f, NodeId n, float r) { f.backprop(&n, &r, 1, nullptr); }

const float kNan = std::nanf("");

// ---- unit -------------------------------------------------------------------------------------

TEST(unit, node_is_small) { CHECK(Forest::bytes_per_node() <= 64); }

TEST(unit, fresh_root_is_its_own_leaf) {
  Forest f(opts());
  const NodeId r = add_tree(f);
  CHECK(f.num_trees() == 1 && f.num_nodes() == 1);
  CHECK(select1(f, r) == r);
  CHECK(in_flight(f, r) == 1);
  f.cancel(&r, 1);
  CHECK(in_flight(f, r) == 0);
  CHECK(visits(f, r) == 0);
}

TEST(unit, uct_prefers_q_then_first_on_ties) {
  Forest f(opts());
  const NodeId r = add_tree(f);
  CHECK(select1(f, r) == r);
  const auto kids = expand1(f, r, {0.5f, kNan, 0.9f});
  CHECK(kids.size() == 3 && kids[0] == r + 1 && kids[2] == r + 3);
  CHECK(visits(f, kids[0]) == 1 && visits(f, kids[1]) == 0);
  f.cancel(&r, 1);
  // Root unvisited: exploration 0, scores are Q = 0.5, 0, 0.9.
  CHECK(select1(f, r) == kids[2]);
  f.cancel(&kids[2], 1);
  Forest g(opts());
  const NodeId r2 = add_tree(g);
  const auto k2 = expand1(g, r2, {kNan, kNan, kNan});
  CHECK(select1(g, r2) == k2[0]);  // ties go to the first child
}

TEST(unit, uct_exploration_term) {
  Forest f(opts());
  const NodeId r = add_tree(f);
  const auto kids = expand1(f, r, {0.2f, 0.3f});
  // Give the root 3 visits through child 0: child0 N=4, W=0.2+3*0.1; child1 N=1, W=0.3.
  for (int i = 0; i < 3; ++i) {
    const NodeId l = select1(f, r);
    f.cancel(&l, 1);
    float v = 0.1f;
    f.update_path(&kids[0], &v, 1);
  }
  CHECK(visits(f, r) == 3);
  const double q0 = (0.2 + 3 * static_cast<double>(0.1f)) / 4, q1 = static_cast<double>(0.3f);
  const double s0 = q0 + 2.0 * std::sqrt(std::log(3.0) / 4), s1 = q1 + 2.0 * std::sqrt(std::log(3.0) / 1);
  CHECK(s1 > s0);
  CHECK(select1(f, r) == kids[1]);
}

TEST(unit, terminal_children_skipped_and_dead_end) {
  Forest f(opts());
  const NodeId r = add_tree(f);
  const auto kids = expand1(f, r, {0.9f, 0.1f});
  f.set_terminal(&kids[0], 1);
  CHECK(select1(f, r) == kids[1]);
  f.cancel(&kids[1], 1);
  f.set_terminal(&kids[1], 1);
  CHECK(select1(f, r) == kNoNode);
  CHECK((flags(f, r) & (kFlagTerminal | kFlagDeadEnd)) == (kFlagTerminal | kFlagDeadEnd));
  CHECK(in_flight(f, r) == 0);
  CHECK(select1(f, r) == kNoNode);
}

TEST(unit, expand_with_no_children_is_a_dead_end) {
  Forest f(opts());
  const NodeId r = add_tree(f);
  CHECK(expand1(f, r, {}).empty());
  CHECK(flags(f, r) & kFlagTerminal);
  CHECK(select1(f, r) == kNoNode);
}

TEST(unit, children_deeper_than_max_depth_are_terminal) {
  Forest f(opts(0.0, 1));
  const NodeId r = add_tree(f);
  const auto kids = expand1(f, r, {kNan});
  CHECK(flags(f, kids[0]) == 0);
  const auto grand = expand1(f, kids[0], {0.5f, kNan});
  CHECK(flags(f, grand[0]) == (kFlagTerminal | kFlagTooDeep | kFlagValued));
  CHECK(flags(f, grand[1]) == (kFlagTerminal | kFlagTooDeep));
  CHECK(visits(f, grand[0]) == 1);
  int32_t d;
  f.depth(&grand[1], 1, &d);
  CHECK(d == 2);
  CHECK(select1(f, r) == kNoNode);  // kids[0]'s children are all terminal
  CHECK(flags(f, kids[0]) & kFlagDeadEnd);
  CHECK(!(flags(f, r) & kFlagDeadEnd));  // one level per select, as the reference
  CHECK(select1(f, r) == kNoNode);
  CHECK(flags(f, r) & kFlagDeadEnd);
}

TEST(unit, backprop_through_child_ends_the_parents_select) {
  Forest f(opts(1.0));
  const NodeId r = add_tree(f);
  const NodeId leaf = select1(f, r);
  const auto kids = expand1(f, leaf, {0.5f, kNan});
  backprop1(f, kids[1], -1.0f);
  CHECK(in_flight(f, r) == 0);
  CHECK(visits(f, r) == 1 && value_sum(f, r) == -1.0);
  CHECK(visits(f, kids[1]) == 1 && visits(f, kids[0]) == 1);
  float fv;
  f.first_value(&kids[1], 1, &fv);
  CHECK(fv == -1.0f);
  f.first_value(&r, 1, &fv);
  CHECK(fv == -1.0f);
  // A second backprop has no select left to end.
  CHECK_THROWS(backprop1(f, kids[1], 1.0f), NodeStateError);
  CHECK(visits(f, r) == 1);
}

TEST(unit, virtual_loss_spreads_selects) {
  Forest f(opts(1.0));
  const NodeId r = add_tree(f);
  const auto kids = expand1(f, r, {kNan, kNan});
  const NodeId roots[2] = {r, r};
  NodeId out[2];
  f.select(roots, 2, out);
  CHECK(out[0] == kids[0] && out[1] == kids[1]);
  CHECK(in_flight(f, r) == 2);
  f.cancel(out, 2);
  CHECK(in_flight(f, r) == 0 && in_flight(f, kids[0]) == 0);
  // Without virtual loss both land on the first child.
  Forest g(opts(0.0));
  const NodeId r2 = add_tree(g);
  const auto k2 = expand1(g, r2, {kNan, kNan});
  const NodeId roots2[2] = {r2, r2};
  g.select(roots2, 2, out);
  CHECK(out[0] == k2[0] && out[1] == k2[0]);
}

TEST(unit, puct_uses_priors) {
  Forest f(opts(0.0, 16, 1, Rule::kPuct));
  const NodeId r = add_tree(f);
  const auto kids = expand1(f, r, {kNan, kNan});
  float v = 0.0f;
  f.update_local(&r, &v, 1);  // N_parent = 1 so the prior term is not 0
  const float pri[2] = {0.1f, 0.9f};
  f.set_priors(kids.data(), pri, 2);
  CHECK(select1(f, r) == kids[1]);
}

TEST(unit, bad_input_leaves_forest_unchanged) {
  Forest f(opts(1.0));
  const NodeId r = add_tree(f);
  const NodeId leaf = select1(f, r);
  const NodeId bogus = 99;
  NodeId out[4];
  CHECK_THROWS(f.select(&bogus, 1, out), UnknownNodeError);
  const NodeId neg = -5;
  CHECK_THROWS(f.visits(&neg, 1, nullptr), UnknownNodeError);
  const int64_t count = 2;
  const float vals[1] = {0.5f};
  CHECK_THROWS(f.expand(&leaf, &count, 1, vals, 1, out), ShapeError);
  const int64_t negc = -1;
  CHECK_THROWS(f.expand(&leaf, &negc, 1, vals, 0, out), InvalidValueError);
  const NodeId dup[2] = {leaf, leaf};
  const int64_t counts[2] = {1, 0};
  CHECK_THROWS(f.expand(dup, counts, 2, vals, 1, out), InvalidValueError);
  CHECK(state(f, leaf) == kFresh && f.num_nodes() == 1);
  const float inf = INFINITY;
  CHECK_THROWS(f.expand(&leaf, &counts[0], 1, &inf, 1, out), InvalidValueError);
  // Cancel of [valid, never selected] changes nothing.
  const auto kids = expand1(f, leaf, {kNan});
  CHECK_THROWS(f.expand(&leaf, &counts[0], 1, vals, 1, out), NodeStateError);
  const NodeId both[2] = {leaf, kids[0]};
  // kids[0] is a child of a pending leaf: the first item claims it, the second finds none.
  CHECK_THROWS(f.cancel(both, 2), NodeStateError);
  CHECK(in_flight(f, r) == 1);
  const float nan_reward = kNan;
  CHECK_THROWS(f.backprop(&leaf, &nan_reward, 1, nullptr), InvalidValueError);
  const uint8_t reserved = kFlagTerminal;
  CHECK_THROWS(f.set_flags(&leaf, &reserved, 1), InvalidValueError);
  CHECK_THROWS(f.select(&kids[0], 1, out), NodeStateError);  // not a root
  f.cancel(&leaf, 1);
  CHECK(in_flight(f, r) == 0 && visits(f, r) == 0);
  f.set_terminal(&kids[0], 1);
  CHECK_THROWS(expand1(f, kids[0], {}), NodeStateError);
  ForestOptions bad = opts();
  bad.max_depth = -1;
  CHECK_THROWS(Forest g(bad), InvalidValueError);
}

TEST(unit, explicit_leaves_in_backprop) {
  Forest f(opts(1.0));
  const NodeId r = add_tree(f);
  const NodeId leaf = select1(f, r);
  const auto kids = expand1(f, leaf, {kNan});
  const auto grand = expand1(f, kids[0], {kNan});
  const float rew = 1.0f;
  CHECK_THROWS(f.backprop(&grand[0], &rew, 1, &kids[0]), NodeStateError);  // no select at kids[0]
  const NodeId other = add_tree(f);
  CHECK_THROWS(f.backprop(&grand[0], &rew, 1, &other), InvalidValueError);  // not an ancestor
  f.backprop(&grand[0], &rew, 1, &leaf);
  CHECK(in_flight(f, r) == 0 && visits(f, r) == 1 && visits(f, grand[0]) == 1);
}

TEST(unit, payloads_and_path_tokens) {
  Forest f(opts());
  const NodeId r = add_tree(f);
  const auto kids = expand1(f, r, {kNan, kNan});
  const auto grand = expand1(f, kids[1], {kNan});
  const int32_t prompt[3] = {1, 2, 3}, step1[2] = {7, 8}, step2[1] = {9};
  const NodeId nodes[3] = {r, kids[1], grand[0]};
  const int32_t* ptrs[3] = {prompt, step1, step2};
  const int64_t lens[3] = {3, 2, 1};
  f.set_tokens(nodes, 3, ptrs, lens);
  const NodeId leaves[3] = {grand[0], kids[0], r};
  const auto p = f.path_tokens(leaves, 3);
  CHECK((p.offsets == std::vector<int64_t>{0, 6, 9, 12}));
  CHECK((p.data == std::vector<int32_t>{1, 2, 3, 7, 8, 9, 1, 2, 3, 1, 2, 3}));
  const char* texts[2] = {"Q: ", "# Step 1"};
  const int64_t tlens[2] = {3, 8};
  f.set_texts(nodes, 2, texts, tlens);
  const auto t = f.path_texts(&grand[0], 1);
  CHECK(std::string(t.data.begin(), t.data.end()) == "Q: # Step 1");
  const char* again[1] = {"Q2"};
  const int64_t alen[1] = {2};
  f.set_texts(nodes, 1, again, alen);  // replacing a payload
  const auto t2 = f.texts(nodes, 2);
  CHECK(std::string(t2.data.begin(), t2.data.end()) == "Q2# Step 1");
  CHECK((t2.offsets == std::vector<int64_t>{0, 2, 10}));
}

TEST(unit, save_load_round_trip_and_corruption) {
  Forest f(opts(1.0, 3, 1, Rule::kPuct));
  NodeId roots[2];
  f.add_trees(2, roots);
  const NodeId leaf = select1(f, roots[0]);
  const auto kids = expand1(f, leaf, {0.5f, kNan, -0.25f});
  expand1(f, kids[0], {kNan});
  backprop1(f, kids[2], 1.0f);
  f.set_terminal(&kids[1], 1);
  const int32_t toks[2] = {5, 6};
  const int32_t* tp[1] = {toks};
  const int64_t tl[1] = {2};
  f.set_tokens(&roots[0], 1, tp, tl);
  const char* txt[1] = {"step"};
  const int64_t xl[1] = {4};
  f.set_texts(&kids[0], 1, txt, xl);
  const NodeId pending = select1(f, roots[1]);  // in flight: not saved
  const std::string path = "forest_test_save.bin";
  f.save(path);
  auto g = Forest::load(path, 1);
  CHECK(g->num_nodes() == f.num_nodes() && g->num_trees() == 2);
  CHECK(g->options().rule == Rule::kPuct && g->options().max_depth == 3 && g->options().virtual_loss == 1.0);
  const auto a = f.export_tree(roots[0]), b = g->export_tree(roots[0]);
  CHECK(a.ids == b.ids && a.visits == b.visits && a.value_sum == b.value_sum && a.flags == b.flags);
  CHECK(in_flight(*g, pending) == 0);
  const NodeId leaf2 = kids[0] + 3;  // kids[0]'s child
  const auto pt = g->path_tokens(&leaf2, 1);
  CHECK((pt.data == std::vector<int32_t>{5, 6}));
  const auto tx = g->texts(&kids[0], 1);
  CHECK(std::string(tx.data.begin(), tx.data.end()) == "step");
  // Corrupt one byte in the middle, truncate, bad magic, missing file.
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto write = [&](const std::string& content) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(content.data(), static_cast<std::streamsize>(content.size()));
  };
  std::string flipped = bytes;
  flipped[flipped.size() / 2] ^= 0x40;
  write(flipped);
  CHECK_THROWS(Forest::load(path, 1), CorruptFileError);
  for (size_t cut : {size_t{0}, size_t{5}, size_t{40}, bytes.size() - 1}) {
    write(bytes.substr(0, cut));
    CHECK_THROWS(Forest::load(path, 1), CorruptFileError);
  }
  write("not a forest file at all, just some text");
  CHECK_THROWS(Forest::load(path, 1), CorruptFileError);
  std::remove(path.c_str());
  CHECK_THROWS(Forest::load(path, 1), IoError);
}

TEST(unit, thread_pool_runs_every_item_once) {
  ThreadPool pool(4);
  std::vector<std::atomic<int>> hits(10000);
  pool.parallel_for(10000, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
  });
  for (auto& h : hits) CHECK(h.load() == 1);
  CHECK_THROWS(pool.parallel_for(1000, 10, [](int64_t, int64_t) { throw InvalidValueError("x"); }),
               InvalidValueError);
}

TEST(unit, add_trees_beyond_capacity_names_n) {
  Forest f(opts());
  const int64_t too_many = Forest::max_nodes() + 1;
  CHECK_THROWS(f.check_add_trees(too_many), InvalidValueError);
  CHECK_THROWS(f.add_trees(too_many, nullptr), InvalidValueError);
  CHECK_THROWS(f.add_trees(-1, nullptr), InvalidValueError);
  try {
    f.check_add_trees(too_many);
  } catch (const InvalidValueError& e) {
    CHECK(std::string(e.what()).find("n = " + std::to_string(too_many)) != std::string::npos);
  }
  CHECK(f.num_nodes() == 0 && f.num_trees() == 0);
  f.check_add_trees(5);
}

TEST(unit, descend_claims_the_simulation_once) {
  Forest f(opts(1.0));
  const NodeId r = add_tree(f);
  const NodeId leaf = select1(f, r);
  const auto kids = expand1(f, leaf, {kNan, kNan});
  NodeId out[2] = {-7, -7};
  const NodeId dup[2] = {leaf, leaf};
  CHECK_THROWS(f.descend(dup, 2, out), NodeStateError);  // one simulation cannot move twice
  CHECK(in_flight(f, r) == 1 && in_flight(f, kids[0]) == 0 && out[0] == -7);
  f.descend(&leaf, 1, out);
  CHECK(out[0] == kids[0] && in_flight(f, r) == 1 && in_flight(f, kids[0]) == 1);
  // The simulation moved: the old leaf holds none now, so a second descend (or a cancel of
  // it) fails and changes nothing.
  CHECK_THROWS(f.descend(&leaf, 1, out), NodeStateError);
  // All or nothing: the first item's claim is given back when the second has none.
  const NodeId other = add_tree(f);
  const NodeId other_leaf = select1(f, other);
  const NodeId two[2] = {other_leaf, leaf};
  CHECK_THROWS(f.descend(two, 2, out), NodeStateError);
  CHECK(in_flight(f, other) == 1);
  f.cancel(&other_leaf, 1);
  CHECK_THROWS(f.cancel(&other_leaf, 1), NodeStateError);
  // A leaf that is not expanded stays the leaf and keeps its simulation.
  const NodeId again = select1(f, other);
  f.descend(&again, 1, out);
  CHECK(out[0] == other);
  f.cancel(&again, 1);
  CHECK(in_flight(f, other) == 0);
  // A dead end (every child terminal): kNoNode, the simulation stays at the leaf.
  f.set_terminal(&kids[1], 1);
  const auto grand = expand1(f, kids[0], {kNan});
  f.set_terminal(&grand[0], 1);
  f.descend(&kids[0], 1, out);
  CHECK(out[0] == kNoNode && in_flight(f, kids[0]) == 1);
  f.cancel(&kids[0], 1);
  CHECK(in_flight(f, r) == 0 && in_flight(f, kids[0]) == 0);
}

TEST(unit, expand_with_payloads_is_checked_first) {
  Forest f(opts());
  const NodeId r = add_tree(f);
  const int64_t count = 2;
  const float values[2] = {kNan, 0.5f};
  NodeId out[2];
  const char* texts[2] = {"a", "bc"};
  const int64_t text_lens[2] = {1, 2};
  const int32_t t0[2] = {1, 2}, t1[1] = {-3};
  const int32_t* tokens[2] = {t0, t1};
  const int64_t token_lens[2] = {2, 1};
  const uint8_t terminal[2] = {1, 0};
  ExpandPayloads p;
  p.token_ptrs = tokens;
  p.token_lens = token_lens;
  CHECK_THROWS(f.expand(&r, &count, 1, values, 2, out, p), InvalidValueError);  // negative id
  const int64_t huge_lens[2] = {1, int64_t{1} << 24};
  std::vector<char> big(size_t{1} << 24, 'x');
  const char* big_texts[2] = {"a", big.data()};
  ExpandPayloads q;
  q.text_ptrs = big_texts;
  q.text_lens = huge_lens;
  CHECK_THROWS(f.expand(&r, &count, 1, values, 2, out, q), InvalidValueError);  // too long
  CHECK(state(f, r) == kFresh && f.num_nodes() == 1);
  const int32_t good1[1] = {3};
  tokens[1] = good1;
  ExpandPayloads ok;
  ok.text_ptrs = texts;
  ok.text_lens = text_lens;
  ok.token_ptrs = tokens;
  ok.token_lens = token_lens;
  ok.terminal = terminal;
  CHECK(f.expand(&r, &count, 1, values, 2, out, ok) == 2);
  const auto tx = f.texts(out, 2);
  CHECK(std::string(tx.data.begin(), tx.data.end()) == "abc" && (tx.offsets == std::vector<int64_t>{0, 1, 3}));
  const auto tk = f.tokens(out, 2);
  CHECK((tk.data == std::vector<int32_t>{1, 2, 3}) && (tk.offsets == std::vector<int64_t>{0, 2, 3}));
  CHECK((flags(f, out[0]) & kFlagTerminal) && !(flags(f, out[1]) & kFlagTerminal));
  CHECK(select1(f, r) == out[1]);
  // set_tokens refuses negative ids too, and changes nothing.
  const int32_t* neg[1] = {t1};
  const int64_t one[1] = {1};
  CHECK_THROWS(f.set_tokens(&out[1], 1, neg, one), InvalidValueError);
  CHECK((f.tokens(&out[1], 1).data == std::vector<int32_t>{3}));
}

TEST(unit, save_load_refuse_bad_arguments_first) {
  Forest f(opts());
  add_tree(f);
  const std::string with_nul("forest_test_nul\0.bin", 20);
  CHECK_THROWS(f.save(with_nul), InvalidValueError);
  CHECK(std::fopen("forest_test_nul", "rb") == nullptr && std::fopen("forest_test_nul.tmp", "rb") == nullptr);
  CHECK_THROWS(Forest::load(with_nul, 1), InvalidValueError);
  const std::string path = "forest_test_threads.bin";
  f.save(path);
  CHECK_THROWS(Forest::load(path, -1), InvalidValueError);  // the caller's fault, not the file's
  CHECK_THROWS(Forest::load("no_such_forest_file.bin", -1), InvalidValueError);
  CHECK(Forest::load(path, 1)->num_nodes() == 1);
  std::remove(path.c_str());
}

// ---- concurrency ------------------------------------------------------------------------------

// Several threads run whole simulations on the same trees through the batch API (each batch
// call itself fanned out over the forest's pool) while others read payloads and statistics.
// Afterwards: nothing in flight, and every node's visits and value sum are exactly what the
// recorded backprops, scored children and local updates put there.
TEST(concurrency, simulations_from_many_threads) {
  Forest f(opts(1.0, 6, 3));
  constexpr int kTrees = 8, kThreads = 6, kRounds = 60;
  std::vector<NodeId> roots(kTrees);
  f.add_trees(kTrees, roots.data());
  struct Log {
    std::vector<NodeId> backprops;  // node each backprop started at (reward +1 or -1)
    std::vector<float> rewards;
    std::vector<NodeId> scored;     // children created with a value (one visit each)
    std::vector<float> scores;
    int failed_expands = 0;
  };
  std::vector<Log> logs(kThreads);
  std::atomic<bool> stop_readers{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(1234 + t);
      Log& log = logs[t];
      std::vector<NodeId> leaves(roots.size());
      for (int round = 0; round < kRounds; ++round) {
        f.select(roots.data(), kTrees, leaves.data());
        for (NodeId leaf : leaves) {
          if (leaf == kNoNode) continue;
          const int action = static_cast<int>(rng() % 4);
          if (action == 0) {
            f.cancel(&leaf, 1);
            continue;
          }
          const float reward = (rng() % 2) ? 1.0f : -1.0f;
          if (action == 1) {
            f.backprop(&leaf, &reward, 1, nullptr);
            log.backprops.push_back(leaf);
            log.rewards.push_back(reward);
            continue;
          }
          const int64_t count = 1 + static_cast<int64_t>(rng() % 3);
          std::vector<float> values(static_cast<size_t>(count));
          for (auto& v : values) v = (rng() % 2) ? 0.5f : kNan;
          std::vector<NodeId> kids(values.size());
          try {
            f.expand(&leaf, &count, 1, values.data(), count, kids.data());
          } catch (const NodeStateError&) {  // another thread expanded this leaf first
            ++log.failed_expands;
            f.cancel(&leaf, 1);
            continue;
          }
          for (size_t j = 0; j < kids.size(); ++j) {
            if (!std::isnan(values[j])) {
              log.scored.push_back(kids[j]);
              log.scores.push_back(values[j]);
            }
          }
          const NodeId through = kids[rng() % kids.size()];
          const int32_t toks[2] = {static_cast<int32_t>(through), t};
          const int32_t* tp[1] = {toks};
          const int64_t tl[1] = {2};
          f.set_tokens(&through, 1, tp, tl);
          // Name the select this backprop ends: once `leaf` is expanded, another thread's
          // select may stop at `through` itself, and the implicit rule (a pending select at the
          // node first, else one at its parent) would end that thread's select instead.
          f.backprop(&through, &reward, 1, &leaf);
          log.backprops.push_back(through);
          log.rewards.push_back(reward);
        }
      }
    });
  }
  std::thread reader([&] {
    while (!stop_readers.load()) {
      const auto p = f.path_tokens(roots.data(), kTrees);
      CHECK(p.offsets.size() == kTrees + 1);
      std::vector<int64_t> v(roots.size());
      f.visits(roots.data(), kTrees, v.data());
      const auto e = f.export_tree(roots[0]);
      CHECK(!e.ids.empty());
    }
  });
  for (auto& th : threads) th.join();
  stop_readers.store(true);
  reader.join();

  const int64_t n = f.num_nodes();
  std::vector<NodeId> all(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) all[i] = i;
  std::vector<int64_t> expected_visits(static_cast<size_t>(n), 0), got_visits(static_cast<size_t>(n));
  std::vector<double> expected_sum(static_cast<size_t>(n), 0.0), got_sum(static_cast<size_t>(n));
  std::vector<NodeId> parents(static_cast<size_t>(n));
  std::vector<int32_t> pending(static_cast<size_t>(n));
  f.parent(all.data(), n, parents.data());
  f.visits(all.data(), n, got_visits.data());
  f.value_sum(all.data(), n, got_sum.data());
  f.in_flight(all.data(), n, pending.data());
  int64_t backprops = 0;
  for (const Log& log : logs) {
    for (size_t k = 0; k < log.backprops.size(); ++k) {
      ++backprops;
      for (NodeId x = log.backprops[k]; x != kNoParent; x = parents[x]) {
        ++expected_visits[x];
        expected_sum[x] += log.rewards[k];
      }
    }
    for (size_t k = 0; k < log.scored.size(); ++k) {
      ++expected_visits[log.scored[k]];
      expected_sum[log.scored[k]] += log.scores[k];
    }
  }
  CHECK(backprops > 0);
  for (int64_t i = 0; i < n; ++i) {
    CHECK(pending[i] == 0);
    CHECK(got_visits[i] == expected_visits[i]);
    CHECK(std::fabs(got_sum[i] - expected_sum[i]) < 1e-9);
  }
}

TEST(concurrency, racing_expands_claim_once) {
  Forest f(opts(1.0, 16, 2));
  constexpr int kThreads = 4;
  std::vector<NodeId> roots(64);
  f.add_trees(64, roots.data());
  std::atomic<int> wins{0}, losses{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (NodeId r : roots) {
        const int64_t count = 2;
        const float values[2] = {kNan, 0.25f};
        NodeId kids[2];
        try {
          f.expand(&r, &count, 1, values, 2, kids);
          wins.fetch_add(1);
        } catch (const NodeStateError&) {
          losses.fetch_add(1);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(wins.load() == 64 && losses.load() == 64 * (kThreads - 1));
  CHECK(f.num_nodes() == 64 * 3);
  for (NodeId r : roots) CHECK(f.children(r).size() == 2);
}

// A descend and a cancel race for the one simulation a leaf holds: exactly one of them gets it,
// and no counter goes negative (a check-then-decrement would let both through).
TEST(concurrency, descend_and_cancel_race_for_one_simulation) {
  constexpr int kRounds = 400;
  int descended = 0, cancelled = 0;
  for (int round = 0; round < kRounds; ++round) {
    Forest f(opts(1.0, 16, 1));
    const NodeId r = add_tree(f);
    const NodeId leaf = select1(f, r);
    const auto kids = expand1(f, leaf, {kNan, kNan});
    std::atomic<int> ready{0};
    bool got_descend = false, got_cancel = false;
    NodeId next = -7;
    std::thread a([&] {
      ready.fetch_add(1);
      while (ready.load() < 2) {
      }
      try {
        f.descend(&leaf, 1, &next);
        got_descend = true;
      } catch (const NodeStateError&) {
      }
    });
    std::thread b([&] {
      ready.fetch_add(1);
      while (ready.load() < 2) {
      }
      try {
        f.cancel(&leaf, 1);
        got_cancel = true;
      } catch (const NodeStateError&) {
      }
    });
    a.join();
    b.join();
    CHECK(got_descend != got_cancel);
    descended += got_descend;
    cancelled += got_cancel;
    CHECK(in_flight(f, r) >= 0 && in_flight(f, kids[0]) >= 0 && in_flight(f, kids[1]) >= 0);
    if (got_descend) {
      CHECK(next == kids[0] && in_flight(f, r) == 1 && in_flight(f, kids[0]) == 1);
      f.cancel(&next, 1);
    }
    CHECK(in_flight(f, r) == 0 && in_flight(f, kids[0]) == 0);
    CHECK_THROWS(f.cancel(&leaf, 1), NodeStateError);
  }
  CHECK(descended + cancelled == kRounds);
}

// expand with payloads publishes the children with them: a concurrent select that reaches a
// child always finds its tokens and text, and never the child created terminal.
TEST(concurrency, expand_publishes_children_with_their_payloads) {
  constexpr int kTrees = 32;
  constexpr int64_t kLen = 4096;
  Forest f(opts(0.0, 16, 2));
  std::vector<NodeId> roots(kTrees);
  f.add_trees(kTrees, roots.data());
  std::vector<int32_t> ids(kLen);
  for (int64_t t = 0; t < kLen; ++t) ids[t] = static_cast<int32_t>(t + 1);
  std::vector<int64_t> counts(kTrees, 2);
  std::vector<float> values(2 * kTrees, kNan);
  std::vector<const int32_t*> token_ptrs(2 * kTrees, ids.data());
  std::vector<int64_t> token_lens(2 * kTrees, kLen);
  std::vector<const char*> text_ptrs(2 * kTrees, "step");
  std::vector<int64_t> text_lens(2 * kTrees, 4);
  std::vector<uint8_t> terminal(2 * kTrees);
  for (int i = 0; i < kTrees; ++i) terminal[2 * i] = 1;  // the first child of each root
  ExpandPayloads p;
  p.token_ptrs = token_ptrs.data();
  p.token_lens = token_lens.data();
  p.text_ptrs = text_ptrs.data();
  p.text_lens = text_lens.data();
  p.terminal = terminal.data();
  std::atomic<bool> done{false};
  int children_seen = 0, terminal_selected = 0, missing_payload = 0;  // the reader's alone
  std::thread reader([&] {
    std::vector<NodeId> leaves(kTrees);
    bool last = false;
    while (!last) {
      last = done.load();
      f.select(roots.data(), kTrees, leaves.data());
      const auto toks = f.path_tokens(leaves.data(), kTrees);
      const auto texts = f.path_texts(leaves.data(), kTrees);
      for (int i = 0; i < kTrees; ++i) {
        if (leaves[i] == roots[i]) continue;
        ++children_seen;
        terminal_selected += (leaves[i] - kTrees) % 2 == 0;  // the first child, created terminal
        missing_payload += toks.offsets[i + 1] - toks.offsets[i] != kLen;
        missing_payload += texts.offsets[i + 1] - texts.offsets[i] != 4;
      }
      f.cancel(leaves.data(), kTrees);
    }
  });
  std::vector<NodeId> out(2 * kTrees);
  f.expand(roots.data(), counts.data(), kTrees, values.data(), 2 * kTrees, out.data(), p);
  done.store(true);
  reader.join();
  CHECK(children_seen > 0 && terminal_selected == 0 && missing_payload == 0);
  for (int i = 0; i < kTrees; ++i) CHECK(out[2 * i + 1] == kTrees + 2 * i + 1);
}

TEST(concurrency, save_while_trees_grow_writes_loadable_files) {
  // Expanders and adders keep changing the structure while saves run: every file loads, and
  // holds each saved node with all of its children.
  Forest f(opts(0.0, 64, 1));
  std::vector<NodeId> roots(16);
  f.add_trees(16, roots.data());
  std::atomic<bool> stop{false};
  std::vector<std::thread> growers;
  for (int t = 0; t < 3; ++t) {
    growers.emplace_back([&, t] {
      std::mt19937 rng(7 + t);
      std::vector<NodeId> leaves(roots.size()), kids;
      while (!stop.load() && f.num_nodes() < 400000) {
        if (t == 2) {  // one adds trees too
          NodeId r;
          f.add_trees(1, &r);
        }
        f.select(roots.data(), static_cast<int64_t>(roots.size()), leaves.data());
        std::vector<int64_t> counts(leaves.size());
        int64_t total = 0;
        for (size_t i = 0; i < leaves.size(); ++i) total += counts[i] = leaves[i] == kNoNode ? 0 : 1 + rng() % 8;
        std::vector<NodeId> live;
        std::vector<int64_t> live_counts;
        for (size_t i = 0; i < leaves.size(); ++i)
          if (leaves[i] != kNoNode) live.push_back(leaves[i]), live_counts.push_back(counts[i]);
        std::vector<float> values(static_cast<size_t>(total), 0.5f);
        kids.resize(static_cast<size_t>(total));
        try {
          f.expand(live.data(), live_counts.data(), static_cast<int64_t>(live.size()), values.data(), total,
                   kids.data());
        } catch (const NodeStateError&) {  // another thread expanded one of them first
        }
        f.cancel(live.data(), static_cast<int64_t>(live.size()));
      }
    });
  }
  int loaded = 0;
  for (int i = 0; i < 20; ++i) {
    const std::string path = "forest_test_save_racing_" + std::to_string(i) + ".bin";
    try {
      f.save(path);
      loaded += Forest::load(path, 1)->num_nodes() > 0;
    } catch (const std::exception& e) {  // CorruptFileError: a torn snapshot
      std::printf("save %d: %s\n", i, e.what());
    }
    std::remove(path.c_str());
  }
  stop.store(true);
  for (auto& t : growers) t.join();
  CHECK(loaded == 20);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string group = argc > 1 ? argv[1] : "all";
  int passed = 0, failed = 0;
  for (const Test& t : registry()) {
    if (group != "all" && group != t.group) continue;
    try {
      t.fn();
      ++passed;
      std::printf("[ok]   %s.%s\n", t.group, t.name);
    } catch (const Failure& e) {
      ++failed;
      std::printf("[FAIL] %s.%s: %s\n", t.group, t.name, e.what.c_str());
    } catch (const std::exception& e) {
      ++failed;
      std::printf("[FAIL] %s.%s: unexpected exception: %s\n", t.group, t.name, e.what());
    }
  }
  std::printf("forest_tests %s: %d passed, %d failed\n", group.c_str(), passed, failed);
  return failed == 0 && passed > 0 ? 0 : 1;
}
