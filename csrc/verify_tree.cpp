// Token-tree verification on the CPU (contract and oracle: verify_tree_ref in
// draftwise/kernels/tree.py).
//
// Per row: the children of every valid node in index order (from `parents`), then a walk down
// from the root. At each visited node the target's law p is computed as the chain kernel computes
// it at a position (target_law: max, argmax and the kept weight z; top-k / top-p thresholds).
// Greedy rows step to the first child whose token is the argmax. Sampled rows try the children by
// recursive rejection: the child of rank i, token x, passes when u * q(x) < r(x), with u the
// Philox draw of counter (i, depth, accept); r starts as p and becomes norm(max(0, r - q)) after
// each rejection (p again when that is empty). When no child passes, the emitted token is the
// race argmax_v r(v) / E_v with the draws of counter (v, depth, race); at a leaf r = p, the bonus.
// Bytes per visited node: its logits row once (twice after a rejection, once more for the race),
// and the q rows of the rejected children. Rows run in parallel; a row's result does not depend on
// the number of threads.

#include "verify_tree.h"

#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace draftwise {
namespace {

constexpr int64_t kNone = -1;
constexpr uint32_t kStreamAccept = 0;  // the counters' third word, as in verify_chain.cpp

int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
  }
  return 0;
}

// The valid nodes' children as linked lists in index order. A node is valid when its token is in
// [0, V) and its parent is valid (the root always is).
struct Tree {
  std::vector<int64_t> first_child, next_sibling, last_child, depth;
  std::vector<char> valid;
  int64_t max_depth = 0;

  void build(const int64_t* tokens, const int64_t* parents, int64_t nodes, int64_t vocab) {
    first_child.assign(nodes, kNone);
    next_sibling.assign(nodes, kNone);
    last_child.assign(nodes, kNone);
    depth.assign(nodes, 0);
    valid.assign(nodes, 0);
    valid[0] = 1;
    max_depth = 0;
    for (int64_t t = 1; t < nodes; ++t) {
      const int64_t p = parents[t], x = tokens[t];
      if (p < 0 || !valid[p] || x < 0 || x >= vocab) continue;  // padding, or below it
      valid[t] = 1;
      depth[t] = depth[p] + 1;
      max_depth = std::max(max_depth, depth[t]);
      if (last_child[p] == kNone) {
        first_child[p] = t;
      } else {
        next_sibling[last_child[p]] = t;
      }
      last_child[p] = t;
    }
  }
};

struct Scratch {
  Tree tree;
  std::vector<float> r, q, noise;  // [V] each: the residual law, a child's q, the race noise
};

// One row's walk: the accepted path and the token emitted after it.
class RowWalk {
 public:
  RowWalk(const TreeArgs& a, int64_t b, Scratch& s)
      : a_(a), b_(b), nodes_(a.num_nodes), vocab_(a.vocab), s_(s),
        tokens_(a.tree_tokens_ptr + b * a.num_nodes),
        seed_(static_cast<uint64_t>(a.seeds_ptr[b])) {
    params_.temperature = a.temperature_ptr[b];
    params_.top_k = a.top_k_ptr[b];
    params_.top_p = a.top_p_ptr[b];
  }

  void run() {
    s_.tree.build(tokens_, a_.parents_ptr + b_ * nodes_, nodes_, vocab_);
    int64_t* path = a_.path_ptr + b_ * nodes_;
    int64_t* out = a_.output_tokens_ptr + b_ * nodes_;
    std::fill(path, path + nodes_, -1);
    std::fill(out, out + nodes_, -1);
    path[0] = 0;
    int64_t node = 0, depth = 0;
    for (;;) {
      const void* logits = logits_row(node);
      const TargetLaw law = target_law(logits, a_.target_logits_dtype, vocab_, params_);
      int64_t token = law.argmax;
      const int64_t next = law.greedy ? argmax_child(node, law.argmax)
                                      : sampled_child(node, depth, logits, law, &token);
      if (next == kNone) {
        out[depth] = token;
        break;
      }
      out[depth] = tokens_[next];
      path[++depth] = node = next;
    }
    a_.num_accepted_ptr[b_] = depth;
    a_.max_depth_ptr[b_] = s_.tree.max_depth;
  }

 private:
  const void* logits_row(int64_t node) const {
    const int64_t offset = (b_ * nodes_ + node) * vocab_ * element_size(a_.target_logits_dtype);
    return static_cast<const char*>(a_.target_logits_ptr) + offset;
  }
  const void* probs_row(int64_t node) const {
    const int64_t offset = (b_ * nodes_ + node) * vocab_ * element_size(a_.draft_probs_dtype);
    return static_cast<const char*>(a_.draft_probs_ptr) + offset;
  }

  int64_t argmax_child(int64_t node, int64_t best) const {
    for (int64_t c = s_.tree.first_child[node]; c != kNone; c = s_.tree.next_sibling[c])
      if (tokens_[c] == best) return c;
    return kNone;
  }

  // The first child to pass recursive rejection, or kNone with *token the race's winner.
  int64_t sampled_child(int64_t node, int64_t depth, const void* logits, const TargetLaw& law,
                        int64_t* token) {
    const bool has_q = a_.draft_probs_ptr != nullptr;
    bool residual = false;  // r is in s_.r; else r = p
    uint32_t rank = 0;
    for (int64_t c = s_.tree.first_child[node]; c != kNone; c = s_.tree.next_sibling[c], ++rank) {
      const int64_t x = tokens_[c];
      const double q_x = has_q ? draft_prob(probs_row(c), a_.draft_probs_dtype, x) : 1.0;
      const double r_x =
          residual ? double(s_.r[x]) : target_prob(logits, a_.target_logits_dtype, x, law);
      float u;
      philox_uniforms(seed_, rank, uint32_t(depth), kStreamAccept, 1, &u);
      if (double(u) * q_x < r_x) return c;
      if (!residual) target_probs(logits, a_.target_logits_dtype, vocab_, law, s_.r.data());
      residual = subtract(c, x, has_q);
    }
    if (!residual) target_probs(logits, a_.target_logits_dtype, vocab_, law, s_.r.data());
    *token = race(depth);
    return kNone;
  }

  // r <- norm(max(0, r - q_c)); false when that is empty (r is then p again).
  bool subtract(int64_t c, int64_t x, bool has_q) {
    float* r = s_.r.data();
    if (has_q) {
      float* q = s_.q.data();
      draft_probs_row(probs_row(c), a_.draft_probs_dtype, vocab_, q);
      for (int64_t v = 0; v < vocab_; ++v) r[v] = std::max(r[v] - q[v], 0.0f);
    } else {  // one-hot q at x
      r[x] = std::max(r[x] - 1.0f, 0.0f);
    }
    double total = 0.0;
    for (int64_t v = 0; v < vocab_; ++v) total += r[v];
    if (!(total > 0.0)) return false;
    for (int64_t v = 0; v < vocab_; ++v) r[v] = static_cast<float>(double(r[v]) / total);
    return true;
  }

  // Exponential race over r: argmax_v r(v) / E_v, the lowest index on ties.
  int64_t race(int64_t depth) {
    float* noise = s_.noise.data();
    const float* r = s_.r.data();
    philox_race_exponentials(seed_, uint32_t(depth), vocab_, noise);
    float best = -1.0f;
    int64_t arg = 0;
    for (int64_t v = 0; v < vocab_; ++v) {
      const float key = r[v] / noise[v];
      if (key > best) {
        best = key;
        arg = v;
      }
    }
    return arg;
  }

  const TreeArgs& a_;
  const int64_t b_, nodes_, vocab_;
  Scratch& s_;
  const int64_t* tokens_;
  const uint64_t seed_;
  TargetParams params_;
};

// The raw-pointer interface cannot see buffer sizes; it checks what it can (the messages of
// draftwise/kernels/tree.py where they overlap).
void check_args(const TreeArgs& a) {
  if (a.batch < 0 || a.num_nodes < 1 || a.vocab < 1)
    throw std::invalid_argument("sizes: expected batch >= 0, num_nodes >= 1 and vocab >= 1");
  if (a.tree_tokens_ptr == nullptr || a.parents_ptr == nullptr || a.target_logits_ptr == nullptr ||
      a.temperature_ptr == nullptr || a.top_k_ptr == nullptr || a.top_p_ptr == nullptr ||
      a.seeds_ptr == nullptr || a.path_ptr == nullptr || a.output_tokens_ptr == nullptr ||
      a.num_accepted_ptr == nullptr || a.max_depth_ptr == nullptr)
    throw std::invalid_argument("buffers: a required buffer address is 0");
  if (element_size(a.target_logits_dtype) == 0)
    throw std::invalid_argument("target_logits: unsupported dtype code");
  if (a.draft_probs_ptr != nullptr && element_size(a.draft_probs_dtype) == 0)
    throw std::invalid_argument("draft_probs: unsupported dtype code");
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t* parents = a.parents_ptr + b * a.num_nodes;
    if (parents[0] != -1)
      throw std::invalid_argument("parents: node 0 is the root, its parent must be -1");
    for (int64_t t = 1; t < a.num_nodes; ++t)
      if (parents[t] < -1 || parents[t] >= t)
        throw std::invalid_argument(
            "parents: expected every parent before its child (topological order), -1 for none");
  }
  check_sampling_rows(a.temperature_ptr, a.top_k_ptr, a.top_p_ptr, a.batch);
}

}  // namespace

void verify_tree(const TreeArgs& a) {
  check_args(a);
  if (a.batch == 0) return;
  int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  threads = static_cast<int>(std::min<int64_t>(threads, a.batch));
#pragma omp parallel num_threads(threads)
  {
    Scratch s;
    s.r.resize(a.vocab);
    s.q.resize(a.draft_probs_ptr != nullptr ? a.vocab : 0);
    s.noise.resize(a.vocab);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < a.batch; ++b) RowWalk(a, b, s).run();
  }
}

}  // namespace draftwise
