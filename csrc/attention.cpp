// Flash attention on the CPU (forward, backward, decode), and the entry points that hand CUDA
// tensors to csrc/attention_cuda.cu. Called from minigpt/ops/attention.py, which has already
// checked shapes and dtypes; the TORCH_CHECKs here guard the raw-pointer code itself.
//
// Layout of the work: a task is (batch, query head, block of BQ queries). It converts its
// queries to the accumulation type once (pre-multiplied by scale * log2(e), so scores are in
// base 2 and the softmax needs only exp2), then walks blocks of BK keys with an online
// softmax, exactly as the GPU kernels do: only a BQ x BK score tile ever exists. The two
// products per tile (Sᵀ = K Qᵀ and O += P V) run through one register-blocked micro-kernel:
// R rows x NC columns of C stay in vector registers while it streams the shared dimension, so
// the inner loop is broadcast-A / load-B / FMA, which the compiler vectorizes (-march=native,
// `#pragma omp simd`) without BLAS. K and V are converted once per call to padded fp32 tiles
// (Packed), not once per query block that reads them.
//
// Backward (recompute from the saved logsumexp, like FlashAttention-2, atomic-free):
//   with at least as many (batch, kv head) pairs as threads, one task per pair walks its key
//   blocks, looping over the GQA group's query heads and the query blocks that see each key
//   block; dK and dV accumulate in the task's buffers and dQ in a buffer only it writes.
//   Otherwise two passes with finer tasks: pass A the same per (batch, kv head, key block) for
//   dK and dV; pass B per (batch, query head, query block) loops over key blocks for dQ.
// Prefer 512-bit vectors where the CPU has them (GCC otherwise caps auto-vectorization at 256
// bits on many AVX-512 parts); this only steers the cost model, so it is harmless elsewhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include "common.h"
#include "cpu_convert.h"
#include "philox.h"
#ifdef WITH_CUDA
#include "cuda_launchers.h"
#endif

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

namespace minigpt {
namespace {

constexpr int64_t BQ = 64;   // queries per task
constexpr int64_t BK = 64;   // keys per tile
constexpr int64_t VW = 16;   // head dims are padded to a multiple of this (one AVX-512 register)
constexpr double LOG2E = 1.4426950408889634;
constexpr double LN2 = 0.6931471805599453;

inline int64_t pad(int64_t d) { return (d + VW - 1) / VW * VW; }

// 2^x for x <= 0 in plain arithmetic the compiler vectorizes (no libm call): round to nearest
// with the 1.5 * 2^23 trick, a degree-7 Taylor polynomial of 2^f on [-0.5, 0.5] (relative error
// ~1e-8, below float rounding), and the exponent put in the bits. Masked scores (-inf) and
// anything below 2^-125 give exactly 0.
inline float exp2_neg(float x) {
  const float xc = x < -125.f ? -125.f : x;
  const float shifter = 12582912.f;
  const float n = (xc + shifter) - shifter;
  const float f = (xc - n) * 0.6931471805599453f;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -125.f ? 0.f : p * scale;
}
inline double exp2_neg(double x) { return std::exp2(x); }

// C[r][c] (+)= sum_k A[r * ars + k * aks] * B[k * ldb + c] for r < R, c < NC. The R x NC block
// of C lives in registers (R * NC / 16 vector registers) for the whole k loop.
template <typename A, int R, int NC>
inline void micro(const A* a, int64_t ars, int64_t aks, const A* b, int64_t ldb, A* c,
                  int64_t ldc, int64_t K, bool accumulate) {
  A t[R][NC];
  if (accumulate) {
    for (int r = 0; r < R; ++r)
#pragma omp simd
      for (int j = 0; j < NC; ++j) t[r][j] = c[r * ldc + j];
  } else {
    for (int r = 0; r < R; ++r)
#pragma omp simd
      for (int j = 0; j < NC; ++j) t[r][j] = A(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    const A* bk = b + k * ldb;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const A av = a[r * ars + k * aks];
#pragma omp simd
      for (int j = 0; j < NC; ++j) t[r][j] += av * bk[j];
    }
  }
  for (int r = 0; r < R; ++r)
#pragma omp simd
    for (int j = 0; j < NC; ++j) c[r * ldc + j] = t[r][j];
}

// Rows in blocks of R, then one at a time, for a fixed column count NC.
template <typename A, int R, int NC>
inline void gemm_nc(const A* a, int64_t ars, int64_t aks, const A* b, int64_t ldb, A* c,
                    int64_t ldc, int64_t M, int64_t K, bool acc) {
  int64_t r = 0;
  for (; r + R <= M; r += R)
    micro<A, R, NC>(a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc, K, acc);
  if (R > 4 && r + 4 <= M) {
    micro<A, 4, NC>(a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc, K, acc);
    r += 4;
  }
  for (; r < M; ++r) micro<A, 1, NC>(a + r * ars, ars, aks, b, ldb, c + r * ldc, ldc, K, acc);
}

// C (M x N) (+)= A (M x K, strides ars/aks) * B (K x N, row stride ldb). N is a multiple of VW:
// columns go in chunks of 64 with a 16/32/48 tail.
template <typename A>
void gemm(const A* a, int64_t ars, int64_t aks, const A* b, int64_t ldb, A* c, int64_t ldc,
          int64_t M, int64_t N, int64_t K, bool acc) {
  int64_t j = 0;
  // 6 x 64: 24 accumulators of the 32 AVX-512 registers, measured ~8% faster than 4 x 64.
  for (; j + 64 <= N; j += 64) gemm_nc<A, 6, 64>(a, ars, aks, b + j, ldb, c + j, ldc, M, K, acc);
  switch (N - j) {
    case 48: gemm_nc<A, 4, 48>(a, ars, aks, b + j, ldb, c + j, ldc, M, K, acc); break;
    case 32: gemm_nc<A, 6, 32>(a, ars, aks, b + j, ldb, c + j, ldc, M, K, acc); break;
    case 16: gemm_nc<A, 8, 16>(a, ars, aks, b + j, ldb, c + j, ldc, M, K, acc); break;
    default: break;
  }
}

// A tile of `n` rows of a (rows, D) matrix with row stride `rs`, as (n, Dp) in the accumulation
// type, times `mul`; rows n..rows_pad and columns D..Dp are zero.
template <typename T, typename A>
void load_rows(const T* src, int64_t rs, int64_t n, int64_t rows_pad, int64_t D, int64_t Dp,
               A mul, A* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const T* s = src + i * rs;
    A* d = dst + i * Dp;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) d[j] = static_cast<A>(s[j]) * mul;
    for (int64_t j = D; j < Dp; ++j) d[j] = A(0);
  }
  std::fill(dst + n * Dp, dst + rows_pad * Dp, A(0));
}

// The transpose of `n` rows (keys) as (Dp, BK): dst[d * BK + j] = src[j][d], zero-padded.
template <typename T, typename A>
void load_cols(const T* src, int64_t rs, int64_t n, int64_t D, int64_t Dp, A* dst) {
  std::fill(dst, dst + Dp * BK, A(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* s = src + j * rs;
    for (int64_t d = 0; d < D; ++d) dst[d * BK + j] = static_cast<A>(s[d]);
  }
}

// Dropout on the probabilities (a null pointer when off, so dropout_p = 0 runs the code that ran
// before dropout existed: the dropout work sits behind per-tile branches). Probability
// (b, h, i, j) is kept when tl.rand(seed, ((b * Hq + h) * T + i) * S + j) >= p, the Triton
// kernels' mask (kernels/attention.py), regenerated wherever a tile needs it, never stored.
// As there: the forward's normalizer and the saved lse are the undropped softmax's, only the
// P V sum loses the dropped terms and is scaled by 1/(1-p); the backward sums the kept P into
// dV (scaled once at the end) and masks and scales dP before dS = P (dP - delta), where
// delta = rowsum(dO * O) holds with the dropped O too.
struct Dropout {
  uint64_t seed;
  float p;       // compared in float32, as the Triton kernels and the reference receive it
  double scale;  // 1 / (1 - p)
};

struct Geo {
  int64_t B, Hq, Hkv, T, S, D, Dp, rep;
  int64_t qb, qh, qt, kb, kh, ks, vb, vh, vs;  // element strides of q, k, v
  bool causal;
};

// Tasks per thread chunk such that a chunk is worth ~2^22 multiply-adds: tiny problems (decode
// of a small model, gradcheck) then run on the calling thread instead of paying for waking the
// pool, which costs more than the work when the machine is busy.
inline int64_t grain(int64_t work_per_task) {
  return std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, work_per_task));
}

// at::parallel_for with dynamic scheduling: threads take chunks of `grain` tasks from a shared
// counter until none are left. Causal tasks differ in cost (the last query block sees every
// key), and on a shared machine one descheduled thread would otherwise hold a static
// partition's whole share; here the others take over its remaining tasks.
template <typename F>
void dynamic_for(int64_t n, int64_t grain_, const F& body) {
  const int64_t chunk = std::max<int64_t>(1, grain_);
  const int64_t nth = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  if (nth <= 1 || at::in_parallel_region()) {
    if (n > 0) body(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t t0 = next.fetch_add(chunk);
      if (t0 >= n) break;
      body(t0, std::min(n, t0 + chunk));
    }
  });
}

// K or V of every (batch, kv head) converted once to the accumulation type and padded, so the
// tiles are not re-converted (and re-transposed) for every query block that reads them.
// Transposed: per head, per key block, a (Dp, BK) tile. Rows: per head, (nkb * BK, Dp).
// Both take nkb * BK * Dp elements per head and tile kb starts at kb * BK * Dp.
template <typename A>
struct Packed {
  std::vector<A> data;
  int64_t per_head = 0;
  const A* head(int64_t bh) const { return data.data() + bh * per_head; }
};

// Key block kb of one head's K or V (rows of stride ss, from the head's first row) into the
// head's packed buffer dst: a transposed (Dp, BK) tile or a (BK, Dp) row tile, zero-padded.
template <typename T, typename A>
void pack_block(const T* src, int64_t ss, const Geo& g, bool transposed, int64_t kb, A* dst) {
  const int64_t j0 = kb * BK, nk = std::min(BK, g.S - j0);
  if (transposed)
    load_cols<T, A>(src + j0 * ss, ss, nk, g.D, g.Dp, dst + j0 * g.Dp);
  else
    load_rows<T, A>(src + j0 * ss, ss, nk, BK, g.D, g.Dp, A(1), dst + j0 * g.Dp);
}

// One head, all nkb key blocks.
template <typename T, typename A>
void pack_head(const T* src, int64_t ss, const Geo& g, bool transposed, A* dst) {
  const int64_t nkb = (g.S + BK - 1) / BK;
  for (int64_t kb = 0; kb < nkb; ++kb) pack_block<T, A>(src, ss, g, transposed, kb, dst);
}

// Every (batch, kv head), one task per key block.
template <typename T, typename A>
Packed<A> pack(const T* src, int64_t sb, int64_t sh, int64_t ss, const Geo& g, bool transposed) {
  Packed<A> p;
  const int64_t nkb = (g.S + BK - 1) / BK;
  p.per_head = nkb * BK * g.Dp;
  p.data.resize(g.B * g.Hkv * p.per_head);
  at::parallel_for(0, g.B * g.Hkv * nkb, grain(BK * g.Dp * 16), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nkb, b = bh / g.Hkv, h = bh % g.Hkv;
      pack_block<T, A>(src + b * sb + h * sh, ss, g, transposed, t % nkb,
                       p.data.data() + bh * p.per_head);
    }
  });
  return p;
}

// The forward's dropout on a transposed score tile (keys x BQ queries; P after exp2, before the
// P V product): entry (j, i) is the probability of query i, key j0 + j, of flat index
// rng0 + i * S + j0 + j (rng0: the flat index of the tile's first query and key 0). Entries the
// causal mask already zeroed are skipped.
template <typename A>
void drop_cols(A* st, int64_t nq, int64_t nk, int64_t j0, bool causal, int64_t shift,
               int64_t rng0, int64_t S, const Dropout& d) {
  const float p = d.p;
  alignas(64) float u[BQ];
  for (int64_t j = 0; j < nk; ++j) {
    A* col = st + j * BQ;
    const int64_t lo = causal ? std::min<int64_t>(nq, std::max<int64_t>(0, j0 + j - shift)) : 0;
    philox_uniforms(d.seed, static_cast<uint64_t>(rng0 + lo * S + j0 + j),
                    static_cast<uint64_t>(S), nq - lo, u + lo);
#pragma omp simd
    for (int64_t i = lo; i < nq; ++i) col[i] = u[i] >= p ? col[i] : A(0);
  }
}

template <typename A>
struct FwdBuf {
  // qt: the query block transposed (Dp, BQ); k, v: (BK, Dp) tiles when not packed; s: the
  // transposed score tile (BK, BQ); o: (BQ, Dp); per-query softmax state and scratch.
  std::vector<A> qt, k, v, s, o, m, l, mx, alpha, msafe, sum;
  explicit FwdBuf(int64_t Dp)
      : qt(Dp * BQ), k(BK * Dp), v(BK * Dp), s(BK * BQ), o(BQ * Dp), m(BQ), l(BQ), mx(BQ),
        alpha(BQ), msafe(BQ), sum(BQ) {}
};

// Attention for `nq` (<= BQ) query rows against keys [0, nkeys) of one kv head. Row i (0-based
// within the tile) sees key j when j <= i + shift (causal; shift = i0 + S - T), else every key.
// q rows have stride qrs; out rows ors; lse entries lse_s. With `pk`/`pv` (packed K and V rows,
// see Packed) the tiles are read from there; without, they are converted from k and v here.
//
// The score tile is computed transposed, Sᵀ = K Qᵀ (keys x queries), so the online softmax's
// per-query max, rescale and sum run down the columns: plain vertical vector ops over BQ
// queries, with no horizontal reduction per row and tile.
template <typename T, typename A>
void fwd_tile(FwdBuf<A>& w, const T* q, int64_t qrs, int64_t nq, const T* k, int64_t krs,
              const T* v, int64_t vrs, const A* pk, const A* pv, int64_t nkeys, bool causal,
              int64_t shift, int64_t D, int64_t Dp, A qscale, T* out, int64_t ors, A* lse,
              int64_t lse_s, const Dropout* drop, int64_t rng0) {
  const A ninf = -std::numeric_limits<A>::infinity();
  std::fill(w.qt.begin(), w.qt.end(), A(0));
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t d = 0; d < D; ++d) w.qt[d * BQ + i] = static_cast<A>(q[i * qrs + d]) * qscale;
  std::fill(w.o.begin(), w.o.end(), A(0));
  std::fill(w.m.begin(), w.m.end(), ninf);
  std::fill(w.l.begin(), w.l.end(), A(0));
  A* m = w.m.data();
  A* l = w.l.data();
  A* mx = w.mx.data();
  A* alpha = w.alpha.data();
  A* ms = w.msafe.data();
  A* sum = w.sum.data();
  const int64_t end = causal ? std::min(nkeys, nq + shift) : nkeys;
  for (int64_t j0 = 0; j0 < end; j0 += BK) {
    const int64_t nk = std::min(BK, end - j0);
    const A* kr = pk ? pk + j0 * Dp : w.k.data();
    const A* vr = pv ? pv + j0 * Dp : w.v.data();
    if (!pk) load_rows<T, A>(k + j0 * krs, krs, nk, BK, D, Dp, A(1), w.k.data());
    if (!pv) load_rows<T, A>(v + j0 * vrs, vrs, nk, BK, D, Dp, A(1), w.v.data());
    gemm<A>(kr, Dp, 1, w.qt.data(), BQ, w.s.data(), BQ, nk, BQ, D, false);
    if (causal) {
      // Key j0 + j is seen by queries i >= j0 + j - shift.
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t lo = std::min<int64_t>(BQ, j0 + j - shift);
        A* st = w.s.data() + j * BQ;
        for (int64_t i = 0; i < lo; ++i) st[i] = ninf;
      }
    }
    std::copy(m, m + BQ, mx);
    for (int64_t j = 0; j < nk; ++j) {
      const A* st = w.s.data() + j * BQ;
#pragma omp simd
      for (int64_t i = 0; i < BQ; ++i) mx[i] = st[i] > mx[i] ? st[i] : mx[i];
    }
#pragma omp simd
    for (int64_t i = 0; i < BQ; ++i) {
      // A query that has seen no key yet keeps m = -inf: shift by 0 so exp2 gives 0, not nan.
      ms[i] = mx[i] == ninf ? A(0) : mx[i];
      alpha[i] = exp2_neg(m[i] - ms[i]);
      m[i] = mx[i];
      sum[i] = A(0);
    }
    for (int64_t j = 0; j < nk; ++j) {
      A* st = w.s.data() + j * BQ;
#pragma omp simd
      for (int64_t i = 0; i < BQ; ++i) {
        const A p = exp2_neg(st[i] - ms[i]);
        st[i] = p;
        sum[i] += p;
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < BQ; ++i) l[i] = l[i] * alpha[i] + sum[i];
    if (drop) drop_cols<A>(w.s.data(), nq, nk, j0, causal, shift, rng0, nkeys, *drop);
    for (int64_t i = 0; i < nq; ++i) {
      if (alpha[i] == A(1)) continue;
      A* o = w.o.data() + i * Dp;
      const A a = alpha[i];
#pragma omp simd
      for (int64_t d = 0; d < Dp; ++d) o[d] *= a;
    }
    // O += P V, reading P from the transposed tile (row stride 1, k stride BQ).
    gemm<A>(w.s.data(), 1, BQ, vr, Dp, w.o.data(), Dp, nq, Dp, nk, true);
  }
  for (int64_t i = 0; i < nq; ++i) {
    A inv = l[i] > 0 ? A(1) / l[i] : A(0);
    if (drop) inv *= static_cast<A>(drop->scale);
    const A* o = w.o.data() + i * Dp;
    T* dst = out + i * ors;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
    // A row that saw no key: lse = +inf, so the backward's exp2(s - lse) is 0 there. A NaN
    // row (a NaN or inf in q or k) keeps lse = NaN: with +inf its P would come back as 0 and
    // dV would be finite where the reference's is NaN.
    lse[i * lse_s] = l[i] == A(0) ? std::numeric_limits<A>::infinity()
                                  : (m[i] + std::log2(l[i])) * A(LN2);
  }
}

template <typename T>
void fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
             at::Tensor& lse, const Geo& g, double scale, const Dropout* drop) {
  using A = acc_t<T>;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  A* lp = lse.data_ptr<A>();
  const int64_t nqb = (g.T + BQ - 1) / BQ;
  const A qscale = static_cast<A>(scale * LOG2E);
  if (g.B * g.Hkv >= at::get_num_threads()) {
    // Enough (batch, kv head) pairs for every thread: one task per pair converts its K and V
    // once (packed tiles) and runs all its query heads and blocks against them. One parallel
    // region per call: on a busy machine each region's barrier can cost a scheduler slice.
    const int64_t per_head = (g.S + BK - 1) / BK * BK * g.Dp;
    dynamic_for(g.B * g.Hkv, grain(g.rep * g.T * g.S * g.Dp), [&](int64_t t0, int64_t t1) {
      FwdBuf<A> w(g.Dp);
      std::vector<A> pk(per_head), pv(per_head);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / g.Hkv, hk = t % g.Hkv;
        pack_head<T, A>(kp + b * g.kb + hk * g.kh, g.ks, g, false, pk.data());
        pack_head<T, A>(vp + b * g.vb + hk * g.vh, g.vs, g, false, pv.data());
        for (int64_t r = 0; r < g.rep; ++r) {
          const int64_t h = hk * g.rep + r, bh = b * g.Hq + h;
          for (int64_t i0 = 0; i0 < g.T; i0 += BQ) {
            const int64_t nq = std::min(BQ, g.T - i0);
            fwd_tile<T, A>(w, qp + b * g.qb + h * g.qh + i0 * g.qt, g.qt, nq, kp, g.ks, vp, g.vs,
                           pk.data(), pv.data(), g.S, g.causal, i0 + g.S - g.T, g.D, g.Dp,
                           qscale, op + (bh * g.T + i0) * g.D, g.D, lp + bh * g.T + i0, 1,
                           drop, (bh * g.T + i0) * g.S);
          }
        }
      }
    });
    return;
  }
  // Few heads: finer tasks (batch, query head, query block), each converting its K/V tiles.
  dynamic_for(g.B * g.Hq * nqb, grain(BQ * g.S * g.Dp), [&](int64_t t0, int64_t t1) {
    FwdBuf<A> w(g.Dp);
    for (int64_t t = t0; t < t1; ++t) {
      // Latest query blocks (the most keys when causal) first, so the expensive tasks do not
      // come last.
      const int64_t bh = t / nqb, qb = nqb - 1 - t % nqb, b = bh / g.Hq, h = bh % g.Hq;
      const int64_t hk = h / g.rep;
      const int64_t i0 = qb * BQ, nq = std::min(BQ, g.T - i0);
      fwd_tile<T, A>(w, qp + b * g.qb + h * g.qh + i0 * g.qt, g.qt, nq,
                     kp + b * g.kb + hk * g.kh, g.ks, vp + b * g.vb + hk * g.vh, g.vs, nullptr,
                     nullptr, g.S, g.causal, i0 + g.S - g.T, g.D, g.Dp, qscale,
                     op + (bh * g.T + i0) * g.D, g.D, lp + bh * g.T + i0, 1, drop,
                     (bh * g.T + i0) * g.S);
    }
  });
}

// Per query block of the backward: Q (scaled like the forward), dO, the base-2 lse and delta.
template <typename A>
struct BwdBuf {
  std::vector<A> q, dout, lse2, delta, kt, vt, s, dp, acc, acc2, krow;
  explicit BwdBuf(int64_t Dp)
      : q(BQ * Dp), dout(BQ * Dp), lse2(BQ), delta(BQ), kt(Dp * BK), vt(Dp * BK), s(BQ * BK),
        dp(BQ * BK), acc(std::max(BQ, BK) * Dp), acc2(std::max(BQ, BK) * Dp),
        krow(BK * Dp) {}
};

// P and dS for the tile (nq queries from i0, nk keys from j0): P = exp2(S - lse2) with the
// causal/ragged mask, dS = P * (dP - delta). w.s holds S on entry and P on exit; w.dp holds
// dP on entry and dS on exit.
// With dropout (rng0: the flat index of probability (i0, j0) of this query head): w.s gets the
// kept P unscaled (dV is scaled once at the end) and dS uses dP * mask / (1 - p) with the
// undropped P.
template <typename A>
void probs_and_ds_drop(BwdBuf<A>& w, int64_t nq, int64_t nk, int64_t i0, int64_t j0,
                       const Geo& g, const Dropout& d, int64_t rng0) {
  const int64_t shift = i0 + g.S - g.T - j0;
  const float pd = d.p;
  const A dsc = static_cast<A>(d.scale);
  alignas(64) float u[BK];
  for (int64_t i = 0; i < nq; ++i) {
    A* s = w.s.data() + i * BK;
    A* dp = w.dp.data() + i * BK;
    const int64_t lim = g.causal ? std::max<int64_t>(0, std::min(nk, i + shift + 1)) : nk;
    const A l2 = w.lse2[i], dl = w.delta[i];
    philox_uniforms(d.seed, static_cast<uint64_t>(rng0 + i * g.S), 1, lim, u);
#pragma omp simd
    for (int64_t j = 0; j < lim; ++j) {
      const A p = exp2_neg(s[j] - l2);
      const bool keep = u[j] >= pd;
      s[j] = keep ? p : A(0);
      dp[j] = p * ((keep ? dp[j] * dsc : A(0)) - dl);
    }
    for (int64_t j = lim; j < BK; ++j) {
      s[j] = A(0);
      dp[j] = A(0);
    }
  }
}

template <typename A>
void probs_and_ds(BwdBuf<A>& w, int64_t nq, int64_t nk, int64_t i0, int64_t j0, const Geo& g,
                  const Dropout* drop, int64_t rng0) {
  if (drop) return probs_and_ds_drop<A>(w, nq, nk, i0, j0, g, *drop, rng0);
  const int64_t shift = i0 + g.S - g.T - j0;
  for (int64_t i = 0; i < nq; ++i) {
    A* s = w.s.data() + i * BK;
    A* dp = w.dp.data() + i * BK;
    const int64_t lim = g.causal ? std::max<int64_t>(0, std::min(nk, i + shift + 1)) : nk;
    const A l2 = w.lse2[i], dl = w.delta[i];
#pragma omp simd
    for (int64_t j = 0; j < BK; ++j) {
      // lse2 = +inf on rows that see no key, so exp2 gives 0 there too. dS is set to 0, not
      // computed as 0 * (dP - delta): a NaN in v (dP) or in the row (delta) must not reach
      // dQ or dK through a pair the mask hides.
      const A p = j < lim ? exp2_neg(s[j] - l2) : A(0);
      s[j] = p;
      dp[j] = j < lim ? p * (dp[j] - dl) : A(0);
    }
  }
}

template <typename T, typename A>
void load_q_block(BwdBuf<A>& w, const T* q, const T* dout, const A* lse, const A* delta,
                  int64_t qrs, int64_t drs, int64_t nq, const Geo& g, A qscale) {
  load_rows<T, A>(q, qrs, nq, BQ, g.D, g.Dp, qscale, w.q.data());
  load_rows<T, A>(dout, drs, nq, BQ, g.D, g.Dp, A(1), w.dout.data());
  for (int64_t i = 0; i < nq; ++i) {
    w.lse2[i] = lse[i] * A(LOG2E);
    w.delta[i] = delta[i];
  }
}

template <typename T>
void bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
             at::Tensor& dk, at::Tensor& dv, const Geo& g, double scale, const Dropout* drop) {
  using A = acc_t<T>;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const T* dop = dout.data_ptr<T>();
  const A* lp = lse.data_ptr<A>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const int64_t db = dout.stride(0), dh = dout.stride(1), dt = dout.stride(2);
  const A qscale = static_cast<A>(scale * LOG2E);
  const int64_t D = g.D, Dp = g.Dp;

  // delta = rowsum(dO * O), the softmax backward's correction term.
  std::vector<A> delta(g.B * g.Hq * g.T);
  auto fill_delta = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % g.T, bh = r / g.T, b = bh / g.Hq, h = bh % g.Hq;
      const T* o = op + r * D;
      const T* d = dop + b * db + h * dh + t * dt;
      A s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < D; ++j) s += static_cast<A>(o[j]) * static_cast<A>(d[j]);
      delta[r] = s;
    }
  };

  // One key block of one (batch, kv head): dK and dV, summed over the GQA group in the task's
  // buffers. With `dq_acc` ((rep, T, Dp), the group's dQ in the accumulation type, owned by
  // this task alone) it also adds dS K into dQ, so no second pass is needed.
  const int64_t nkb = (g.S + BK - 1) / BK;
  auto key_block = [&](BwdBuf<A>& w, int64_t b, int64_t hk, int64_t kb, A* dq_acc) {
    const int64_t bh = b * g.Hkv + hk;
    const int64_t j0 = kb * BK, nk = std::min(BK, g.S - j0);
    const T* kbase = kp + b * g.kb + hk * g.kh + j0 * g.ks;
    const T* vbase = vp + b * g.vb + hk * g.vh + j0 * g.vs;
    load_cols<T, A>(kbase, g.ks, nk, D, Dp, w.kt.data());
    load_cols<T, A>(vbase, g.vs, nk, D, Dp, w.vt.data());
    if (dq_acc) load_rows<T, A>(kbase, g.ks, nk, BK, D, Dp, A(1), w.krow.data());
    A* dK = w.acc.data();  // (BK, Dp)
    A* dV = w.acc2.data();
    std::fill(dK, dK + BK * Dp, A(0));
    std::fill(dV, dV + BK * Dp, A(0));
    // The first query that sees key j0 is j0 - (S - T).
    const int64_t lo = g.causal ? std::max<int64_t>(0, j0 - (g.S - g.T)) / BQ * BQ : 0;
    for (int64_t r = 0; r < g.rep; ++r) {
      const int64_t h = hk * g.rep + r, qh = b * g.Hq + h;
      for (int64_t i0 = lo; i0 < g.T; i0 += BQ) {
        const int64_t nq = std::min(BQ, g.T - i0);
        load_q_block<T, A>(w, qp + b * g.qb + h * g.qh + i0 * g.qt,
                           dop + b * db + h * dh + i0 * dt, lp + qh * g.T + i0,
                           delta.data() + qh * g.T + i0, g.qt, dt, nq, g, qscale);
        gemm<A>(w.q.data(), Dp, 1, w.kt.data(), BK, w.s.data(), BK, nq, BK, D, false);
        gemm<A>(w.dout.data(), Dp, 1, w.vt.data(), BK, w.dp.data(), BK, nq, BK, D, false);
        probs_and_ds<A>(w, nq, nk, i0, j0, g, drop, (qh * g.T + i0) * g.S + j0);
        // dV += Pᵀ dO, dK += dSᵀ Q (A read transposed: row stride 1, k stride BK).
        gemm<A>(w.s.data(), 1, BK, w.dout.data(), Dp, dV, Dp, nk, Dp, nq, true);
        gemm<A>(w.dp.data(), 1, BK, w.q.data(), Dp, dK, Dp, nk, Dp, nq, true);
        if (dq_acc)
          gemm<A>(w.dp.data(), BK, 1, w.krow.data(), Dp, dq_acc + (r * g.T + i0) * Dp, Dp, nq,
                  Dp, nk, true);
      }
    }
    // Q was scaled by scale * log2(e): dK = scale * dSᵀ q = ln(2) * dSᵀ (scaled q).
    if (drop) {
      const A dsc = static_cast<A>(drop->scale);
      for (int64_t j = 0; j < nk * Dp; ++j) dV[j] *= dsc;
    }
    for (int64_t j = 0; j < nk; ++j) {
      T* dkr = dkp + (bh * g.S + j0 + j) * D;
      T* dvr = dvp + (bh * g.S + j0 + j) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        dkr[d] = static_cast<T>(dK[j * Dp + d] * A(LN2));
        dvr[d] = static_cast<T>(dV[j * Dp + d]);
      }
    }
  };

  if (g.B * g.Hkv >= at::get_num_threads()) {
    // Enough (batch, kv head) pairs to keep every thread busy: one task per pair walks all its
    // key blocks and owns the group's dQ, so P and dS are computed once (5 products per tile
    // instead of the two-pass scheme's 7).
    dynamic_for(g.B * g.Hkv, grain(2 * g.S * g.rep * g.T * g.Dp), [&](int64_t t0, int64_t t1) {
      BwdBuf<A> w(Dp);
      std::vector<A> dq_acc(g.rep * g.T * Dp);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / g.Hkv, hk = t % g.Hkv;
        // The group's query heads are consecutive: its delta rows are one range.
        const int64_t row0 = (b * g.Hq + hk * g.rep) * g.T;
        fill_delta(row0, row0 + g.rep * g.T);
        std::fill(dq_acc.begin(), dq_acc.end(), A(0));
        for (int64_t kb = 0; kb < nkb; ++kb) key_block(w, b, hk, kb, dq_acc.data());
        const A sc = static_cast<A>(scale);
        for (int64_t r = 0; r < g.rep; ++r) {
          T* dst = dqp + ((b * g.Hq + hk * g.rep + r) * g.T) * D;
          const A* src = dq_acc.data() + r * g.T * Dp;
          for (int64_t i = 0; i < g.T; ++i) {
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) dst[i * D + d] = static_cast<T>(src[i * Dp + d] * sc);
          }
        }
      }
    });
    return;
  }

  // Otherwise two passes with finer tasks. Pass A: dK, dV per (batch, kv head, key block).
  at::parallel_for(0, g.B * g.Hq * g.T, grain(g.D * 16), fill_delta);
  dynamic_for(g.B * g.Hkv * nkb, grain(2 * BK * g.rep * g.T * g.Dp), [&](int64_t t0, int64_t t1) {
    BwdBuf<A> w(Dp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nkb;
      key_block(w, bh / g.Hkv, bh % g.Hkv, t % nkb, nullptr);
    }
  });

  // Pass B: dQ per (batch, query head, query block), reading packed Kᵀ, Vᵀ and K tiles.
  const auto pkt = pack<T, A>(kp, g.kb, g.kh, g.ks, g, true);
  const auto pvt = pack<T, A>(vp, g.vb, g.vh, g.vs, g, true);
  const auto pkr = pack<T, A>(kp, g.kb, g.kh, g.ks, g, false);
  const int64_t nqb = (g.T + BQ - 1) / BQ;
  dynamic_for(g.B * g.Hq * nqb, grain(2 * BQ * g.S * Dp), [&](int64_t t0, int64_t t1) {
    BwdBuf<A> w(Dp);
    for (int64_t t = t0; t < t1; ++t) {
      // Latest query blocks (the most keys when causal) first, so the expensive tasks do not
      // come last.
      const int64_t bh = t / nqb, qb = nqb - 1 - t % nqb, b = bh / g.Hq, h = bh % g.Hq;
      const int64_t hk = h / g.rep;
      const int64_t i0 = qb * BQ, nq = std::min(BQ, g.T - i0);
      load_q_block<T, A>(w, qp + b * g.qb + h * g.qh + i0 * g.qt, dop + b * db + h * dh + i0 * dt,
                         lp + bh * g.T + i0, delta.data() + bh * g.T + i0, g.qt, dt, nq, g,
                         qscale);
      A* dQ = w.acc.data();
      std::fill(dQ, dQ + BQ * Dp, A(0));
      const int64_t end = g.causal ? std::min(g.S, i0 + nq + g.S - g.T) : g.S;
      const int64_t kvh = b * g.Hkv + hk;
      for (int64_t j0 = 0; j0 < end; j0 += BK) {
        const int64_t nk = std::min(BK, g.S - j0);
        const A* kt = pkt.head(kvh) + j0 * Dp;
        const A* vt = pvt.head(kvh) + j0 * Dp;
        const A* kr = pkr.head(kvh) + j0 * Dp;
        gemm<A>(w.q.data(), Dp, 1, kt, BK, w.s.data(), BK, nq, BK, D, false);
        gemm<A>(w.dout.data(), Dp, 1, vt, BK, w.dp.data(), BK, nq, BK, D, false);
        probs_and_ds<A>(w, nq, nk, i0, j0, g, drop, (bh * g.T + i0) * g.S + j0);
        gemm<A>(w.dp.data(), BK, 1, kr, Dp, dQ, Dp, nq, Dp, nk, true);
      }
      const A sc = static_cast<A>(scale);
      for (int64_t i = 0; i < nq; ++i) {
        T* dst = dqp + (bh * g.T + i0 + i) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(dQ[i * Dp + d] * sc);
      }
    }
  });
}

// Decode: one query per sequence. The tiled kernel's 64-query tiles would be ~95% padding here
// (a GQA group has a few query heads), which made a decode step's attention cost as much as
// a 64-token prefill's. Instead a task takes `hs` query heads of one kv head: each cached key
// and value row is read once for all of them (a long cache streams from memory once per kv
// head, not once per query head), scores go to a buffer, one softmax per head, then the
// values are summed with those weights. `hs` is the whole GQA group unless that leaves too few
// tasks to keep every thread busy (SmolLM2 at batch 1: 3 kv heads on 2 threads -> hs = 2).
template <typename T>
void decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& seqlens, at::Tensor& out, const Geo& g, double scale) {
  using A = acc_t<T>;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int32_t* lens = seqlens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  const int64_t D = g.D, S = g.S;
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  int64_t hs = g.rep;
  while (hs > 1 && g.B * g.Hkv * ((g.rep + hs - 1) / hs) < want) hs = (hs + 1) / 2;
  const int64_t nsub = (g.rep + hs - 1) / hs;
  dynamic_for(g.B * g.Hkv * nsub, grain(2 * hs * S * D), [&](int64_t t0, int64_t t1) {
    std::vector<A> qf(hs * D), o(hs * D), p(hs * S), sum(hs);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t sub = t % nsub, bk = t / nsub, b = bk / g.Hkv, hk = bk % g.Hkv;
      const int64_t h0 = hk * g.rep + sub * hs, nh = std::min(hs, g.rep - sub * hs);
      const int64_t len = std::min<int64_t>(std::max<int32_t>(lens[b], 0), S);
      for (int64_t r = 0; r < nh; ++r) {
        const T* qrow = qp + b * g.qb + (h0 + r) * g.qh;
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = load(qrow, d) * static_cast<A>(scale);
      }
      const T* kb = kp + b * g.kb + hk * g.kh;
      const T* vb = vp + b * g.vb + hk * g.vh;
      for (int64_t j = 0; j < len; ++j) {
        const T* kj = kb + j * g.ks;
        for (int64_t r = 0; r < nh; ++r) {
          const A* qr = qf.data() + r * D;
          A s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qr[d] * load(kj, d);
          p[r * S + j] = s;
        }
      }
      for (int64_t r = 0; r < nh; ++r) {
        // The max in its own vector pass: kept in the score loop, next to the p stores it
        // could alias, it went through memory on every key.
        A* pr = p.data() + r * S;
        A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < len; ++j) m = std::max(m, pr[j]);
        A total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < len; ++j) {
          pr[j] = exp_nonpos(pr[j] - m);
          total += pr[j];
        }
        sum[r] = total;
      }
      std::fill(o.begin(), o.end(), A(0));
      for (int64_t j = 0; j < len; ++j) {
        const T* vj = vb + j * g.vs;
        for (int64_t r = 0; r < nh; ++r) {
          A* orow = o.data() + r * D;
          const A pj = p[r * S + j];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) orow[d] += pj * load(vj, d);
        }
      }
      for (int64_t r = 0; r < nh; ++r) {
        // No valid key (len 0, which the Python wrapper rejects): zeros, as the reference.
        const A inv = len > 0 ? A(1) / sum[r] : A(0);
        T* dst = op + (b * g.Hq + h0 + r) * D;  // out is contiguous (B, Hq, 1, D)
        for (int64_t d = 0; d < D; ++d) store(dst, d, o[r * D + d] * inv);
      }
    }
  });
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "minigpt: attention takes 4-D q, k, v (B, H, T, D)");
  TORCH_CHECK(k.sizes() == v.sizes(), "minigpt: attention k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "minigpt: attention q and k disagree on batch or head_dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "minigpt: attention query heads must be a multiple of key/value heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "minigpt: attention q, k, v must share a dtype");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "minigpt: attention q, k, v must be on one device");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "minigpt: attention needs a unit stride on the head dimension");
}

Geo make_geo(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  Geo g;
  g.B = q.size(0);
  g.Hq = q.size(1);
  g.T = q.size(2);
  g.D = q.size(3);
  g.Hkv = k.size(1);
  g.S = k.size(2);
  g.Dp = pad(g.D);
  g.rep = g.Hq / g.Hkv;
  g.qb = q.stride(0), g.qh = q.stride(1), g.qt = q.stride(2);
  g.kb = k.stride(0), g.kh = k.stride(1), g.ks = k.stride(2);
  g.vb = v.stride(0), g.vh = v.stride(1), g.vs = v.stride(2);
  g.causal = causal;
  return g;
}

// dropout_p = 0: no dropout (nullopt), the kernels' old code paths.
std::optional<Dropout> make_dropout(const at::Tensor& q, double dropout_p, int64_t seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "minigpt: attention dropout_p must lie in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return std::nullopt;
  TORCH_CHECK(seed >= 0, "minigpt: attention dropout seed must be non-negative, got ", seed);
  TORCH_CHECK(!q.is_cuda(), "minigpt: the CUDA attention kernels have no dropout");
  return Dropout{static_cast<uint64_t>(seed), static_cast<float>(dropout_p),
                 1.0 / (1.0 - dropout_p)};
}

#ifdef WITH_CUDA
MgAttnGeo cuda_geo(const Geo& g) {
  MgAttnGeo c;
  c.B = g.B, c.Hq = g.Hq, c.Hkv = g.Hkv, c.T = g.T, c.S = g.S, c.D = g.D;
  c.qb = g.qb, c.qh = g.qh, c.qt = g.qt;
  c.kb = g.kb, c.kh = g.kh, c.ks = g.ks;
  c.vb = g.vb, c.vh = g.vh, c.vs = g.vs;
  c.causal = g.causal ? 1 : 0;
  return c;
}
#endif

}  // namespace

std::vector<at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, bool causal, double scale,
                                      double dropout_p, int64_t seed) {
  check_qkv(q, k, v);
  const Geo g = make_geo(q, k, v, causal);
  const auto drop = make_dropout(q, dropout_p, seed);
  auto out = at::empty({g.B, g.Hq, g.T, g.D}, q.options());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lse = at::empty({g.B, g.Hq, g.T}, q.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(q.device());
    MINIGPT_CUDA_CHECK(minigpt_attention_fwd_cuda(cuda_geo(g), q.data_ptr(), k.data_ptr(),
                                                  v.data_ptr(), out.data_ptr(),
                                                  lse.data_ptr<float>(), static_cast<float>(scale),
                                                  dtype_code(q),
                                                  c10::cuda::getCurrentCUDAStream()),
                       "attention_fwd");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(q.device().is_cpu(), "minigpt: attention got a tensor on ", q.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd",
                                    [&] { fwd_cpu<scalar_t>(q, k, v, out, lse, g, scale, drop ? &*drop : nullptr); });
  }
  return {out, lse};
}

std::vector<at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& out, const at::Tensor& lse, bool causal,
                                      double scale, double dropout_p, int64_t seed) {
  check_qkv(q, k, v);
  const Geo g = make_geo(q, k, v, causal);
  const auto drop = make_dropout(q, dropout_p, seed);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  dout.stride(3) == 1,
              "minigpt: attention_bwd grad_output must match q with a unit last stride");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() &&
                  out.scalar_type() == q.scalar_type(),
              "minigpt: attention_bwd out must be the contiguous forward output");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == g.B && lse.size(1) == g.Hq && lse.size(2) == g.T &&
                  lse.scalar_type() == acc && lse.is_contiguous(),
              "minigpt: attention_bwd got a logsumexp that does not match q");
  auto dq = at::empty({g.B, g.Hq, g.T, g.D}, q.options());
  auto dk = at::empty({g.B, g.Hkv, g.S, g.D}, k.options());
  auto dv = at::empty({g.B, g.Hkv, g.S, g.D}, v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(q.device());
    auto delta = at::empty({g.B, g.Hq, g.T}, q.options().dtype(at::kFloat));
    MINIGPT_CUDA_CHECK(
        minigpt_attention_bwd_cuda(cuda_geo(g), dout.data_ptr(), dout.stride(0), dout.stride(1),
                                   dout.stride(2), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                   out.data_ptr(), lse.data_ptr<float>(),
                                   delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                                   dv.data_ptr(), static_cast<float>(scale), dtype_code(q),
                                   c10::cuda::getCurrentCUDAStream()),
        "attention_bwd");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd", [&] {
      bwd_cpu<scalar_t>(dout, q, k, v, out, lse, dq, dk, dv, g, scale, drop ? &*drop : nullptr);
    });
  }
  return {dq, dk, dv};
}

at::Tensor decode_attention_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                double scale) {
  check_qkv(q, k_cache, v_cache);
  TORCH_CHECK(q.size(2) == 1, "minigpt: decode_attention takes one query per sequence");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == q.size(0) &&
                  cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous() &&
                  cache_seqlens.device() == q.device(),
              "minigpt: decode_attention cache_seqlens must be a contiguous int32 (B,) tensor "
              "on q's device");
  const Geo g = make_geo(q, k_cache, v_cache, false);
  auto out = at::empty({g.B, g.Hq, 1, g.D}, q.options());
  if (out.numel() == 0) return out;
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    c10::cuda::CUDAGuard guard(q.device());
    int dev = q.device().index(), sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    // Flash-decoding: enough key splits for 8 blocks an SM (B * Hkv * splits blocks of 4
    // warps): the split kernel is bound by memory latency, so the loads it keeps in flight,
    // its warps, set its bandwidth; each split at least 256 keys so the combine stays cheap.
    const int64_t want = std::max<int64_t>(1, (8 * sms + g.B * g.Hkv - 1) / (g.B * g.Hkv));
    const int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>(want, (g.S + 255) / 256));
    const int64_t split_len = (g.S + nsplit - 1) / nsplit;
    auto o_part = at::empty({g.B, g.Hq, nsplit, g.D}, q.options().dtype(at::kFloat));
    auto lse_part = at::empty({g.B, g.Hq, nsplit}, q.options().dtype(at::kFloat));
    MINIGPT_CUDA_CHECK(minigpt_decode_attention_cuda(
                           cuda_geo(g), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                           cache_seqlens.data_ptr<int32_t>(), o_part.data_ptr<float>(),
                           lse_part.data_ptr<float>(), out.data_ptr(), nsplit, split_len,
                           static_cast<float>(scale), dtype_code(q),
                           c10::cuda::getCurrentCUDAStream()),
                       "decode_attention");
#else
    TORCH_CHECK(false, "minigpt._C was built without CUDA");
#endif
  } else {
    TORCH_CHECK(q.device().is_cpu(), "minigpt: decode_attention got a tensor on ", q.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention", [&] {
      decode_cpu<scalar_t>(q, k_cache, v_cache, cache_seqlens, out, g, scale);
    });
  }
  return out;
}

}  // namespace minigpt
