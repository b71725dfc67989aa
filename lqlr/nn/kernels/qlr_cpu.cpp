// lqlr CPU kernels: y = x (Q + L R)ᵀ + b straight from the packed storage of QLRLinear.
//
// A packed matrix (rows, cols) is the on-disk format of lqlr/packing.py and lqlr/quantizers.py:
// codes as one little-endian bit stream (code i at bits [i·b, (i+1)·b)), fp16 scales per
// (row, group), and for the uniform grid b-bit zero points packed the same way; the value of a
// code c is (c − z)·s (uniform) or lut[c]·s (NormalFloat). Eight codes of b bits are b bytes,
// so the GEMV reads 8 codes with one 64-bit load and spreads them over 8 lanes with one
// variable shift (AVX2), multiplies by x and folds the scale in once per group:
//     y[m, o] = Σ_g s[o,g] · (Σ_{j∈g} c[o,j]·x[m,j] − z[o,g] · Σ_{j∈g} x[m,j]).
// Many rows of x (prefill) instead dequantize a tile of rows of the matrix and call at::mm.
// An E8P matrix (lqlr/core/e8p.py) stores one 16-bit codeword index per 8 weights (the 8 2-bit
// codes of the stream): source point a = table[idx >> 8] (8 floats ≥ 0), sign bits (idx >> 1) & 127
// for coordinates 0..6, coordinate 7's sign the one that makes the count of negatives ≡ parity[a],
// and ±¼ by idx & 1; the value is s·(±a ± ¼). The GEMV decodes a codeword into 8 lanes (sign bits
// xor-ed into the floats) and multiplies it by x, with no dense copy.
// A trellis matrix (lqlr/core/trellis.py) stores one k-bit digit per weight; tiles of 16 rows × 16
// columns are tail-biting streams read row by row, and weight (o, j)'s value is s·code[state], the state
// the last L bits of its tile's stream up to its digit. The GEMV rebuilds the state from the previous
// row's last digits in the tile (cyclically) and this row's 16, one 64-bit load each, and looks up the
// 2^L-value code table (computed, in cache), again with no dense copy.
// Incoherence rotations x Vᵀ / y U are fast Walsh–Hadamard transforms per power-of-two block,
// a small m×m orthogonal mix across blocks, and random signs (lqlr/incoherence.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LQLR_AVX2 1
#else
#define LQLR_AVX2 0
#endif

namespace {

struct Packed {
  torch::Tensor codes;  // uint8 bit stream, or (rows, cols) fp16 when bits == 16
  torch::Tensor scale;  // (rows, ng) fp16
  torch::Tensor zero;   // uint8 bit stream of rows·ng zero points (uniform grid) or undefined
  torch::Tensor lut;    // (2^bits,) float32 levels (NormalFloat) or undefined
  torch::Tensor book;   // (256, 8) float32 E8P source points, or undefined
  torch::Tensor tcode;  // (2^L,) float32 trellis code values, or undefined
  int64_t state_bits = 0;  // trellis: L
  std::vector<uint8_t> parity;  // E8P: sum of each source point mod 2
  int64_t rows = 0, cols = 0, bits = 0, group = 0, ng = 0;

  Packed(torch::Tensor codes_, torch::Tensor scale_, std::optional<torch::Tensor> zero_,
         std::optional<torch::Tensor> lut_, int64_t rows_, int64_t cols_, int64_t bits_, int64_t group_,
         std::optional<torch::Tensor> book_, std::optional<torch::Tensor> trellis_)
      : codes(codes_), scale(scale_), rows(rows_), cols(cols_), bits(bits_), group(group_) {
    if (zero_) zero = *zero_;
    if (lut_) lut = lut_->to(torch::kFloat32).contiguous();
    TORCH_CHECK(bits == 16 || (bits >= 1 && bits <= 8), "packed matrix: bits must be 1-8 or 16, got ", bits);
    if (trellis_) {
      tcode = trellis_->to(torch::kFloat32).contiguous();
      const int64_t S = tcode.numel();
      TORCH_CHECK(S >= 2 && (S & (S - 1)) == 0, "trellis: the code table must hold 2^L values");
      state_bits = 63 - __builtin_clzll(static_cast<unsigned long long>(S));
      TORCH_CHECK(bits >= 2 && bits <= 4 && state_bits > bits && state_bits <= 20 && group % 16 == 0 && cols % 16 == 0
                  && !zero_ && !lut_ && !book_, "trellis: 2-4 bit digits, L in (bits, 20], groups and rows of whole 16-column "
                  "tiles, no zero, lut or book");
    }
    if (book_) {
      book = book_->to(torch::kFloat32).contiguous();
      TORCH_CHECK(book.numel() == 256 * 8, "E8P: the codebook holds 256 source points of 8 coordinates");
      TORCH_CHECK(bits == 2 && group % 8 == 0 && cols % 8 == 0 && !zero.defined() && !lut.defined(),
                  "E8P: 2-bit codes, groups and rows a multiple of 8 weights, no zero or lut");
      const float* b = book.data_ptr<float>();
      parity.resize(256);
      for (int i = 0; i < 256; ++i) {
        float t = 0.f;
        for (int k = 0; k < 8; ++k) t += b[i * 8 + k];
        parity[i] = static_cast<uint8_t>(static_cast<int64_t>(std::lround(t)) & 1);
      }
    }
    if (bits == 16) {
      TORCH_CHECK(codes.scalar_type() == torch::kHalf && codes.is_contiguous(), "fp16 factor must be contiguous fp16");
      return;
    }
    TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "codes must be contiguous uint8");
    TORCH_CHECK(codes.numel() * 8 >= rows * cols * bits, "codes buffer too short");
    TORCH_CHECK(group >= 1, "group size must be positive");
    ng = (cols + group - 1) / group;
    TORCH_CHECK(scale.scalar_type() == torch::kHalf && scale.is_contiguous() && scale.numel() == rows * ng,
                "scale must be contiguous fp16 of rows x groups");
    TORCH_CHECK(book.defined() || tcode.defined() || zero.defined() != lut.defined(),
                "give exactly one of zero (uniform) and lut (NormalFloat)");
    if (zero.defined())
      TORCH_CHECK(zero.scalar_type() == torch::kUInt8 && zero.is_contiguous() && zero.numel() * 8 >= rows * ng * bits,
                  "zero must be a contiguous uint8 bit stream of rows x groups codes");
    if (lut.defined()) TORCH_CHECK(lut.numel() == (int64_t(1) << bits), "lut must hold 2^bits levels");
  }
};

// 64 bits of the stream starting at bit `bitpos` (zero past the end of the buffer).
inline uint64_t read64(const uint8_t* p, int64_t nbytes, int64_t bitpos) {
  const int64_t byte = bitpos >> 3;
  uint64_t w = 0;
  if (byte + 8 <= nbytes) {
    std::memcpy(&w, p + byte, 8);
  } else if (byte < nbytes) {
    std::memcpy(&w, p + byte, nbytes - byte);
  }
  return w >> (bitpos & 7);
}

inline uint32_t read_code(const uint8_t* p, int64_t nbytes, int64_t index, int bits) {
  return static_cast<uint32_t>(read64(p, nbytes, index * bits)) & ((1u << bits) - 1u);
}

struct RowCtx {
  const uint8_t* codes;
  int64_t nbytes;
  const at::Half* scale;
  const uint8_t* zero;
  int64_t zbytes;
  const float* lut;
  int bits;
};

#if LQLR_AVX2
// The 8 codes of a 64-bit word (code k at bits [k·b, (k+1)·b)) as 8 int32 lanes.
inline __m256i spread8(uint64_t w, int bits, __m256i shifts, __m256i mask) {
  const int lo = static_cast<int>(static_cast<uint32_t>(w));
  const int hi = static_cast<int>(static_cast<uint32_t>(w >> (4 * bits)));
  const __m256i v = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
  return _mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if LQLR_AVX2
// 8 codes starting at byte p (a chunk of 8 codes of b bits is b bytes, byte-aligned) as 8 int32.
// shifts8 = (0, b, …, 7b) for b <= 4 (one 32-bit word), shifts = (0, b, 2b, 3b, 0, b, 2b, 3b) otherwise.
inline __m256i load8(const uint8_t* p, int b, __m256i shifts, __m256i shifts8, __m256i mask) {
  uint32_t lo;
  std::memcpy(&lo, p, 4);
  if (b <= 4) return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(lo)), shifts8), mask);
  uint32_t hi;
  std::memcpy(&hi, p + (b >> 1), 4);  // codes 4..7 start at bit 4b
  hi >>= (4 * b) & 7;
  const __m256i v = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
  return _mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask);
}

inline float half_to_float(at::Half h) { return _cvtsh_ss(h.x); }
#else
inline float half_to_float(at::Half h) { return static_cast<float>(h); }
#endif

// Codes [c0, c1) of row `o` times MB rows of x: Σ_j v(c[o,j])·x[m,j] added to gt[m]; the fast
// (aligned, in-bounds) part is accumulated into gacc by the caller when AVX2 is on.
template <int MB, bool NF>
inline void dot_generic(const RowCtx& c, int64_t code0, int64_t c0, int64_t c1, const float* x, int64_t ldx,
                        float* gt) {
  const int b = c.bits;
  int64_t j = c0;
  for (; j + 8 <= c1; j += 8) {
    const uint64_t w = read64(c.codes, c.nbytes, (code0 + j) * b);
    float v[8];
    for (int k = 0; k < 8; ++k) {
      const uint32_t q = static_cast<uint32_t>(w >> (k * b)) & ((1u << b) - 1u);
      v[k] = NF ? c.lut[q] : static_cast<float>(q);
    }
    for (int m = 0; m < MB; ++m)
      for (int k = 0; k < 8; ++k) gt[m] += v[k] * x[m * ldx + j + k];
  }
  for (; j < c1; ++j) {
    const uint32_t q = read_code(c.codes, c.nbytes, code0 + j, b);
    const float v = NF ? c.lut[q] : static_cast<float>(q);
    for (int m = 0; m < MB; ++m) gt[m] += v * x[m * ldx + j];
  }
}

// y[m, o] for o in [r0, r1) and MB rows of x; xsum (MB, ng) holds the per-group sums of x.
template <int MB, bool NF>
void gemv_rows(const RowCtx& c, int64_t cols, int64_t group, int64_t ng, const float* x, int64_t ldx,
               const float* xsum, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  const int b = c.bits;
#if LQLR_AVX2
  const __m256i shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 0, b, 2 * b, 3 * b);
  const __m256i shifts8 = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
  const __m256i mask = _mm256_set1_epi32((1 << b) - 1);
#endif
  for (int64_t o = r0; o < r1; ++o) {
    float tail[MB];
    for (int m = 0; m < MB; ++m) tail[m] = 0.f;
    const int64_t code0 = o * cols;
    // the fast path reads up to 4 bytes past a chunk: keep it inside the buffer
    const bool in_bounds = (code0 + cols) * b / 8 + 4 <= c.nbytes;
#if LQLR_AVX2
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
#endif
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t c0 = g * group, c1 = std::min(c0 + group, cols);
      const float s = half_to_float(c.scale[o * ng + g]);
      const float z = NF ? 0.f : static_cast<float>(read_code(c.zero, c.zbytes, o * ng + g, b));
      float gt[MB];
      for (int m = 0; m < MB; ++m) gt[m] = 0.f;
      int64_t j = c0;
#if LQLR_AVX2
      // chunks of 8 codes (b bytes each) are byte-aligned when the group's first code is
      if (in_bounds && (((code0 + c0) * b) & 7) == 0) {
        const uint8_t* p = c.codes + (code0 + c0) * b / 8;
        __m256 a0[MB], a1[MB];
        for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
        for (; j + 16 <= c1; j += 16, p += 2 * b) {
          const __m256i q0 = load8(p, b, shifts, shifts8, mask), q1 = load8(p + b, b, shifts, shifts8, mask);
          const __m256 v0 = NF ? _mm256_i32gather_ps(c.lut, q0, 4) : _mm256_cvtepi32_ps(q0);
          const __m256 v1 = NF ? _mm256_i32gather_ps(c.lut, q1, 4) : _mm256_cvtepi32_ps(q1);
          for (int m = 0; m < MB; ++m) {
            a0[m] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + m * ldx + j), a0[m]);
            a1[m] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + m * ldx + j + 8), a1[m]);
          }
        }
        for (; j + 8 <= c1; j += 8, p += b) {
          const __m256i q0 = load8(p, b, shifts, shifts8, mask);
          const __m256 v0 = NF ? _mm256_i32gather_ps(c.lut, q0, 4) : _mm256_cvtepi32_ps(q0);
          for (int m = 0; m < MB; ++m) a0[m] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + m * ldx + j), a0[m]);
        }
        const __m256 vs = _mm256_set1_ps(s);
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(_mm256_add_ps(a0[m], a1[m]), vs, acc[m]);
      }
#endif
      dot_generic<MB, NF>(c, code0, j, c1, x, ldx, gt);
      for (int m = 0; m < MB; ++m) tail[m] += s * (gt[m] - z * xsum[m * ng + g]);
    }
    for (int m = 0; m < MB; ++m) {
#if LQLR_AVX2
      y[m * ldy + o] = hsum(acc[m]) + tail[m];
#else
      y[m * ldy + o] = tail[m];
#endif
    }
  }
}

// ---- E8P codewords ---------------------------------------------------------------------------
struct E8PCtx {
  const uint8_t* codes;   // 2 bits per weight: one little-endian 16-bit index per 8 weights
  const float* book;      // (256, 8) source points
  const uint8_t* parity;  // (256,)
  const at::Half* scale;  // (rows, ng)
  int64_t cols, group, ng;

  explicit E8PCtx(const Packed& P)
      : codes(P.codes.data_ptr<uint8_t>()), book(P.book.data_ptr<float>()), parity(P.parity.data()),
        scale(P.scale.data_ptr<at::Half>()), cols(P.cols), group(P.group), ng(P.ng) {}

  // the index of the codeword holding weights [j, j + 8) of row o (j a multiple of 8)
  uint32_t index(int64_t o, int64_t j) const {
    const uint8_t* p = codes + (o * cols + j) / 4;
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8);
  }

  // bit k set: coordinate k of the codeword is negative
  uint32_t negatives(uint32_t idx) const {
    const uint32_t s7 = (idx >> 1) & 127u;
    uint32_t ones = s7;  // popcount of 7 bits
    ones = ones - ((ones >> 1) & 0x55u);
    ones = (ones & 0x33u) + ((ones >> 2) & 0x33u);
    ones = (ones + (ones >> 4)) & 0x0Fu;
    const uint32_t last = (ones + parity[idx >> 8]) & 1u;
    return s7 | (last << 7);
  }

  void decode(uint32_t idx, float* v) const {
    const float* a = book + (idx >> 8) * 8;
    const uint32_t neg = negatives(idx);
    const float shift = (idx & 1u) ? 0.25f : -0.25f;
    for (int k = 0; k < 8; ++k) v[k] = (((neg >> k) & 1u) ? -a[k] : a[k]) + shift;
  }

#if LQLR_AVX2
  __m256 decode8(uint32_t idx, __m256i lanes, __m256i to_sign) const {
    const __m256 a = _mm256_loadu_ps(book + (idx >> 8) * 8);
    const __m256i bit = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(negatives(idx))), lanes);
    const __m256 sign = _mm256_castsi256_ps(_mm256_sllv_epi32(bit, to_sign));  // bit k → the sign bit of lane k
    return _mm256_add_ps(_mm256_xor_ps(a, sign), _mm256_set1_ps((idx & 1u) ? 0.25f : -0.25f));
  }
#endif
};

// y[m, o] for o in [r0, r1) and MB rows of x, E8P codewords: Σ_g s[o,g] · Σ_{codewords in g} v·x.
template <int MB>
void gemv_rows_e8p(const E8PCtx& c, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1) {
#if LQLR_AVX2
  const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i to_sign = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
#endif
  for (int64_t o = r0; o < r1; ++o) {
    float tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = 0.f;
    for (int64_t g = 0; g < c.ng; ++g) {
      const int64_t c0 = g * c.group, c1 = std::min(c0 + c.group, c.cols);
      const float s = half_to_float(c.scale[o * c.ng + g]);
#if LQLR_AVX2
      __m256 acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t j = c0; j < c1; j += 8) {
        const __m256 v = c.decode8(c.index(o, j), lanes, to_sign);
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * ldx + j), acc[m]);
      }
      for (int m = 0; m < MB; ++m) tot[m] += s * hsum(acc[m]);
#else
      float gt[MB];
      for (int m = 0; m < MB; ++m) gt[m] = 0.f;
      float v[8];
      for (int64_t j = c0; j < c1; j += 8) {
        c.decode(c.index(o, j), v);
        for (int m = 0; m < MB; ++m)
          for (int k = 0; k < 8; ++k) gt[m] += v[k] * x[m * ldx + j + k];
      }
      for (int m = 0; m < MB; ++m) tot[m] += s * gt[m];
#endif
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + o] = tot[m];
  }
}

// y = x Pᵀ for a codebook matrix (E8P, trellis): rows of P in parallel, up to 4 rows of x at a time through
// Rows<MB>::run(ctx, x, ldx, y, ldy, r0, r1)
template <template <int> class Rows, class Ctx>
void gemv_codebook(const Ctx& c, const Packed& P, const float* x, int64_t M, float* y) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(P.cols * M, 1));
  at::parallel_for(0, P.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, M - m0);
      const float* xm = x + m0 * P.cols;
      float* ym = y + m0 * P.rows;
      switch (mb) {
        case 1: Rows<1>::run(c, xm, P.cols, ym, P.rows, r0, r1); break;
        case 2: Rows<2>::run(c, xm, P.cols, ym, P.rows, r0, r1); break;
        case 3: Rows<3>::run(c, xm, P.cols, ym, P.rows, r0, r1); break;
        default: Rows<4>::run(c, xm, P.cols, ym, P.rows, r0, r1); break;
      }
    }
  });
}

template <int MB>
struct E8PRows {
  static void run(const E8PCtx& c, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1) {
    gemv_rows_e8p<MB>(c, x, ldx, y, ldy, r0, r1);
  }
};

// ---- trellis digits --------------------------------------------------------------------------
struct TrellisCtx {
  const uint8_t* codes;  // k bits per weight, row-major
  int64_t nbytes;
  const float* code;     // (2^L,) values
  const at::Half* scale; // (rows, ng)
  int64_t rows, cols, group, ng, full;
  int bits, m;           // m = ceil(L / k): digits that make up a state
  uint32_t mask;

  explicit TrellisCtx(const Packed& P)
      : codes(P.codes.data_ptr<uint8_t>()), nbytes(P.codes.numel()), code(P.tcode.data_ptr<float>()),
        scale(P.scale.data_ptr<at::Half>()), rows(P.rows), cols(P.cols), group(P.group), ng(P.ng),
        full(P.rows - P.rows % 16), bits(static_cast<int>(P.bits)),
        m(static_cast<int>((P.state_bits + P.bits - 1) / P.bits)),
        mask((1u << P.state_bits) - 1u) {}

  // the row before o in its tile's stream: o − 1, or the tile's last row for its first row
  int64_t prev_row(int64_t o) const {
    const int64_t t0 = o < full ? o - o % 16 : full;
    const int64_t h = o < full ? 16 : rows - full;
    return o == t0 ? t0 + h - 1 : o - 1;
  }

  // the 16 digits of row o at columns [j0, j0 + 16) in one word (digit q at bits q·k)
  uint64_t word(int64_t o, int64_t j0) const { return read64(codes, nbytes, (o * cols + j0) * bits); }

  // unscaled values of row o's weights [j0, j0 + 16) (j0 a multiple of 16)
  void decode16(int64_t o, int64_t j0, float* v) const {
    const uint64_t before = word(prev_row(o), j0), here = word(o, j0);
    const uint32_t dmask = (1u << bits) - 1u;
    uint32_t s = 0;
    for (int q = 16 - (m - 1); q < 16; ++q) s = (s << bits) | (static_cast<uint32_t>(before >> (q * bits)) & dmask);
    for (int q = 0; q < 16; ++q) {
      s = ((s << bits) | (static_cast<uint32_t>(here >> (q * bits)) & dmask)) & mask;
      v[q] = code[s];
    }
  }
};

// y[m, o] for o in [r0, r1) and MB rows of x, trellis digits: Σ_g s[o,g] · Σ_{tiles in g} v·x.
template <int MB>
void gemv_rows_trellis(const TrellisCtx& c, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  alignas(32) float v[16];
  for (int64_t o = r0; o < r1; ++o) {
    float tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = 0.f;
    for (int64_t g = 0; g < c.ng; ++g) {
      const int64_t c0 = g * c.group, c1 = std::min(c0 + c.group, c.cols);
      const float s = half_to_float(c.scale[o * c.ng + g]);
#if LQLR_AVX2
      __m256 acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t j = c0; j < c1; j += 16) {
        c.decode16(o, j, v);
        const __m256 v0 = _mm256_load_ps(v), v1 = _mm256_load_ps(v + 8);
        for (int m = 0; m < MB; ++m) {
          acc[m] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + m * ldx + j), acc[m]);
          acc[m] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + m * ldx + j + 8), acc[m]);
        }
      }
      for (int m = 0; m < MB; ++m) tot[m] += s * hsum(acc[m]);
#else
      float gt[MB];
      for (int m = 0; m < MB; ++m) gt[m] = 0.f;
      for (int64_t j = c0; j < c1; j += 16) {
        c.decode16(o, j, v);
        for (int m = 0; m < MB; ++m)
          for (int q = 0; q < 16; ++q) gt[m] += v[q] * x[m * ldx + j + q];
      }
      for (int m = 0; m < MB; ++m) tot[m] += s * gt[m];
#endif
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + o] = tot[m];
  }
}

template <int MB>
struct TrellisRows {
  static void run(const TrellisCtx& c, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r0, int64_t r1) {
    gemv_rows_trellis<MB>(c, x, ldx, y, ldy, r0, r1);
  }
};

RowCtx ctx_of(const Packed& P) {
  RowCtx c;
  c.codes = P.codes.data_ptr<uint8_t>();
  c.nbytes = P.codes.numel();
  c.scale = P.scale.data_ptr<at::Half>();
  c.zero = P.zero.defined() ? P.zero.data_ptr<uint8_t>() : nullptr;
  c.zbytes = P.zero.defined() ? P.zero.numel() : 0;
  c.lut = P.lut.defined() ? P.lut.data_ptr<float>() : nullptr;
  c.bits = static_cast<int>(P.bits);
  return c;
}

template <bool NF>
void gemv_dispatch(const RowCtx& c, const Packed& P, const float* x, int64_t M, const float* xsum, float* y) {
  // at least ~32K codes per task: the skinny L and R products and small matrices run serially
  // (a parallel region costs more than they do)
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(P.cols * M, 1));
  at::parallel_for(0, P.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mb = std::min<int64_t>(4, M - m0);
      const float* xm = x + m0 * P.cols;
      const float* sm = xsum + m0 * P.ng;
      float* ym = y + m0 * P.rows;
      switch (mb) {
        case 1: gemv_rows<1, NF>(c, P.cols, P.group, P.ng, xm, P.cols, sm, ym, P.rows, r0, r1); break;
        case 2: gemv_rows<2, NF>(c, P.cols, P.group, P.ng, xm, P.cols, sm, ym, P.rows, r0, r1); break;
        case 3: gemv_rows<3, NF>(c, P.cols, P.group, P.ng, xm, P.cols, sm, ym, P.rows, r0, r1); break;
        default: gemv_rows<4, NF>(c, P.cols, P.group, P.ng, xm, P.cols, sm, ym, P.rows, r0, r1); break;
      }
    }
  });
}

// Dense float32 rows [r0, r1) of the matrix into out (r1 − r0, cols).
void dequant_rows(const Packed& P, int64_t r0, int64_t r1, float* out) {
  if (P.book.defined()) {  // E8P: s · codeword, 8 weights at a time
    const E8PCtx c(P);
    at::parallel_for(r0, r1, std::max<int64_t>(1, 32768 / std::max<int64_t>(P.cols, 1)), [&](int64_t a, int64_t e) {
      float v[8];
      for (int64_t o = a; o < e; ++o) {
        float* dst = out + (o - r0) * P.cols;
        for (int64_t j = 0; j < P.cols; j += 8) {
          const float s = half_to_float(c.scale[o * P.ng + j / P.group]);
          c.decode(c.index(o, j), v);
          for (int k = 0; k < 8; ++k) dst[j + k] = v[k] * s;
        }
      }
    });
    return;
  }
  if (P.tcode.defined()) {  // trellis: s · code[state], 16 weights at a time
    const TrellisCtx c(P);
    at::parallel_for(r0, r1, std::max<int64_t>(1, 32768 / std::max<int64_t>(P.cols, 1)), [&](int64_t a, int64_t e) {
      float v[16];
      for (int64_t o = a; o < e; ++o) {
        float* dst = out + (o - r0) * P.cols;
        for (int64_t j = 0; j < P.cols; j += 16) {
          const float s = half_to_float(c.scale[o * P.ng + j / P.group]);
          c.decode16(o, j, v);
          for (int q = 0; q < 16; ++q) dst[j + q] = v[q] * s;
        }
      }
    });
    return;
  }
  const RowCtx c = ctx_of(P);
  const int b = c.bits;
  const bool nf = P.lut.defined();
  at::parallel_for(r0, r1, std::max<int64_t>(1, 32768 / std::max<int64_t>(P.cols, 1)), [&](int64_t a, int64_t e) {
#if LQLR_AVX2
    const __m256i shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 0, b, 2 * b, 3 * b);
    const __m256i mask = _mm256_set1_epi32((1 << b) - 1);
#endif
    for (int64_t o = a; o < e; ++o) {
      float* dst = out + (o - r0) * P.cols;
      for (int64_t g = 0; g < P.ng; ++g) {
        const int64_t c0 = g * P.group, c1 = std::min(c0 + P.group, P.cols);
        const float s = half_to_float(c.scale[o * P.ng + g]);
        const float z = nf ? 0.f : static_cast<float>(read_code(c.zero, c.zbytes, o * P.ng + g, b));
        int64_t j = c0;
#if LQLR_AVX2
        const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
        for (; j + 8 <= c1; j += 8) {
          const __m256i q = spread8(read64(c.codes, c.nbytes, (o * P.cols + j) * b), b, shifts, mask);
          const __m256 v = nf ? _mm256_i32gather_ps(c.lut, q, 4) : _mm256_cvtepi32_ps(q);
          _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_sub_ps(v, vz), vs));
        }
#endif
        for (; j < c1; ++j) {
          const uint32_t q = read_code(c.codes, c.nbytes, o * P.cols + j, b);
          dst[j] = ((nf ? c.lut[q] : static_cast<float>(q)) - z) * s;
        }
      }
    }
  });
}

torch::Tensor dequantize(const Packed& P) {
  if (P.bits == 16) return P.codes.to(torch::kFloat32).reshape({P.rows, P.cols});
  auto out = torch::empty({P.rows, P.cols}, torch::kFloat32);
  dequant_rows(P, 0, P.rows, out.data_ptr<float>());
  return out;
}

// x (M, cols) float32 contiguous → x Pᵀ (M, rows).
torch::Tensor matmul(const Packed& P, const torch::Tensor& x, int64_t gemv_max_rows) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == P.cols, "x must be (M, ", P.cols, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32");
  const int64_t M = x.size(0);
  if (P.bits == 16) return at::mm(x, P.codes.to(torch::kFloat32).reshape({P.rows, P.cols}).t());
  if (M > gemv_max_rows) {  // prefill: dequantize a tile of rows, then a dense GEMM
    auto y = torch::empty({M, P.rows}, torch::kFloat32);
    const int64_t tile = std::max<int64_t>(16, (int64_t(1) << 20) / std::max<int64_t>(P.cols, 1));
    auto buf = torch::empty({std::min(tile, P.rows), P.cols}, torch::kFloat32);
    for (int64_t r0 = 0; r0 < P.rows; r0 += tile) {
      const int64_t r1 = std::min(r0 + tile, P.rows);
      auto w = buf.narrow(0, 0, r1 - r0);
      dequant_rows(P, r0, r1, w.data_ptr<float>());
      if (r0 == 0 && r1 == P.rows) return at::mm(x, w.t());
      y.narrow(1, r0, r1 - r0).copy_(at::mm(x, w.t()));
    }
    return y;
  }
  auto y = torch::empty({M, P.rows}, torch::kFloat32);
  if (P.book.defined()) {
    gemv_codebook<E8PRows>(E8PCtx(P), P, x.data_ptr<float>(), M, y.data_ptr<float>());
    return y;
  }
  if (P.tcode.defined()) {
    gemv_codebook<TrellisRows>(TrellisCtx(P), P, x.data_ptr<float>(), M, y.data_ptr<float>());
    return y;
  }
  // per-group sums of x for the zero points
  auto xsum = torch::zeros({M, P.ng}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  float* sp = xsum.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < P.ng; ++g) {
      const int64_t c0 = g * P.group, c1 = std::min(c0 + P.group, P.cols);
      float s = 0.f;
      for (int64_t j = c0; j < c1; ++j) s += xp[m * P.cols + j];
      sp[m * P.ng + g] = s;
    }
  const RowCtx c = ctx_of(P);
  if (P.lut.defined()) gemv_dispatch<true>(c, P, xp, M, sp, y.data_ptr<float>());
  else gemv_dispatch<false>(c, P, xp, M, sp, y.data_ptr<float>());
  return y;
}

// ---- incoherence rotations -------------------------------------------------------------------
struct Rot {
  torch::Tensor signs;  // (n,) float32 ±1
  torch::Tensor Om;     // (m, m) float32 orthogonal, or undefined when m == 1
  int64_t n = 0, p = 0, m = 0;

  Rot(torch::Tensor signs_, std::optional<torch::Tensor> Om_, int64_t n_, int64_t p_, int64_t m_)
      : signs(signs_.to(torch::kFloat32).contiguous()), n(n_), p(p_), m(m_) {
    TORCH_CHECK(p > 0 && (p & (p - 1)) == 0 && p * m == n, "rotation: n must be m x p with p a power of two");
    TORCH_CHECK(signs.numel() == n, "rotation: signs must have n entries");
    if (m > 1) {
      TORCH_CHECK(Om_.has_value(), "rotation: the m x m orthogonal factor is required when m > 1");
      Om = Om_->to(torch::kFloat32).contiguous();
      TORCH_CHECK(Om.numel() == m * m, "rotation: Om must be m x m");
    }
  }
};

inline void fwht(float* v, int64_t p, float scale) {
  for (int64_t h = 1; h < p; h <<= 1)
    for (int64_t i = 0; i < p; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
  for (int64_t j = 0; j < p; ++j) v[j] *= scale;
}

// Rows of x (M, n): x Vᵀ (inverse = false) or x V (inverse = true); returns a new tensor.
// Signs and the per-block FWHT run in place on a copy; the m×m mix across blocks is one batched
// matmul (m is the odd part of n, e.g. 9 for 576 = 9·64).
torch::Tensor rotate_rows(const Rot& R, const torch::Tensor& x2, bool inverse) {
  const int64_t M = x2.size(0);
  auto mix = [&](const torch::Tensor& y) {  // block i ← Σ_j O[i,j] block j (O, or Oᵀ for the inverse)
    return at::matmul(inverse ? R.Om.t() : R.Om, y.view({M, R.m, R.p})).reshape({M, R.n});
  };
  torch::Tensor y = (inverse && R.m > 1) ? mix(x2) : x2.clone();
  float* v = y.data_ptr<float>();
  const float* sg = R.signs.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(R.p));
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / R.n), [&](int64_t a, int64_t e) {
    for (int64_t r = a; r < e; ++r) {
      float* row = v + r * R.n;
      if (!inverse)
        for (int64_t t = 0; t < R.n; ++t) row[t] *= sg[t];
      for (int64_t i = 0; i < R.m; ++i) fwht(row + i * R.p, R.p, scale);
      if (inverse)
        for (int64_t t = 0; t < R.n; ++t) row[t] *= sg[t];
    }
  });
  return (!inverse && R.m > 1) ? mix(y) : y;
}

torch::Tensor rotate(const Rot& R, torch::Tensor x, bool inverse) {
  TORCH_CHECK(x.size(-1) == R.n, "rotation of size ", R.n, " applied to rows of size ", x.size(-1));
  auto y = rotate_rows(R, x.to(torch::kFloat32).reshape({-1, R.n}).contiguous(), inverse);
  return y.reshape(x.sizes());
}

// ---- one QLRLinear ---------------------------------------------------------------------------
struct Plan {
  Packed Q;
  std::optional<Packed> L, R;
  std::optional<Rot> V, U;
  torch::Tensor bias;
  int64_t gemv_max_rows;

  Plan(Packed Q_, std::optional<Packed> L_, std::optional<Packed> R_, std::optional<Rot> V_, std::optional<Rot> U_,
       std::optional<torch::Tensor> bias_, int64_t gemv_max_rows_)
      : Q(Q_), L(L_), R(R_), V(V_), U(U_), gemv_max_rows(gemv_max_rows_) {
    if (bias_) bias = *bias_;
    TORCH_CHECK(L.has_value() == R.has_value(), "give both L and R or neither");
    if (L) TORCH_CHECK(L->rows == Q.rows && R->cols == Q.cols && L->cols == R->rows, "L, R do not fit Q");
    if (V) TORCH_CHECK(V->n == Q.cols, "V does not fit Q's columns");
    if (U) TORCH_CHECK(U->n == Q.rows, "U does not fit Q's rows");
  }

  torch::Tensor forward(const torch::Tensor& x) const {
    TORCH_CHECK(x.size(-1) == Q.cols, "input has ", x.size(-1), " features, the layer takes ", Q.cols);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = Q.rows;
    auto xr = x.reshape({-1, Q.cols}).to(torch::kFloat32).contiguous();
    if (V) xr = rotate_rows(*V, xr, false);  // x Vᵀ
    auto y = matmul(Q, xr, gemv_max_rows);  // x' Q'ᵀ
    if (L) y.add_(matmul(*L, matmul(*R, xr, gemv_max_rows), gemv_max_rows));  // (x' R'ᵀ) L'ᵀ
    if (U) y = rotate_rows(*U, y, true);  // y U
    if (bias.defined()) y.add_(bias.to(torch::kFloat32));
    return y.reshape(shape).to(x.scalar_type());
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lqlr CPU kernels for packed QLRLinear layers";
  m.attr("simd") = LQLR_AVX2 ? "avx2" : "portable";
  py::class_<Packed>(m, "Packed")
      .def(py::init<torch::Tensor, torch::Tensor, std::optional<torch::Tensor>, std::optional<torch::Tensor>, int64_t,
                    int64_t, int64_t, int64_t, std::optional<torch::Tensor>, std::optional<torch::Tensor>>(),
           py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("lut"), py::arg("rows"), py::arg("cols"),
           py::arg("bits"), py::arg("group"), py::arg("book") = py::none(), py::arg("trellis") = py::none());
  py::class_<Rot>(m, "Rot").def(py::init<torch::Tensor, std::optional<torch::Tensor>, int64_t, int64_t, int64_t>(),
                                py::arg("signs"), py::arg("Om"), py::arg("n"), py::arg("p"), py::arg("m"));
  py::class_<Plan>(m, "Plan")
      .def(py::init<Packed, std::optional<Packed>, std::optional<Packed>, std::optional<Rot>, std::optional<Rot>,
                    std::optional<torch::Tensor>, int64_t>(),
           py::arg("Q"), py::arg("L"), py::arg("R"), py::arg("V"), py::arg("U"), py::arg("bias"),
           py::arg("gemv_max_rows"))
      .def("forward", &Plan::forward);
  m.def("matmul", &matmul, "x Pᵀ for a packed matrix P", py::arg("P"), py::arg("x"), py::arg("gemv_max_rows"));
  m.def("dequantize", &dequantize, "dense float32 matrix of a packed matrix");
  m.def("rotate", &rotate, "x Vᵀ (inverse: x V)", py::arg("R"), py::arg("x"), py::arg("inverse"));
}
