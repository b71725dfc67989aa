"""Every configuration of lqlr: plain dataclasses, validated in ``__post_init__``.

``QLRConfig`` says how one matrix is decomposed; ``CompressConfig`` says what a whole-model run
does (targets, calibration, budget, export) and is what :func:`lqlr.compress` takes. Hydra builds
these same classes from YAML (``lqlr.cli`` registers them as the schema of its config groups), so
a value is validated once, here, whether it comes from Python or from the command line. Library
code never imports Hydra. Fields that Hydra reads use ``Optional[...]``/``list[...]`` annotations,
which OmegaConf understands.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from lqlr.util.devices import check_device

GRIDS = ("uniform", "nf")  # grids of Q, L and R
# llama.cpp's block formats and their code bits (lqlr.core.gguf_grids implements them): the 32-weight blocks
# and the k-quants' 256-weight super-blocks; GGUF_BLOCKS[kind] is the format's group_size
GGUF_BITS = {"q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "q8_0": 8, "iq4_nl": 4, "q2_k": 2, "q3_k": 3, "q4_k": 4,
             "q5_k": 5, "q6_k": 6, "iq4_xs": 4, "iq3_xxs": 3, "iq2_xs": 2, "iq2_s": 2}
GGUF_BLOCK = 32
GGUF_SUPER_BLOCK = 256
GGUF_BLOCKS = {k: GGUF_SUPER_BLOCK if k.endswith("_k") or k in ("iq4_xs", "iq3_xxs", "iq2_xs", "iq2_s") else GGUF_BLOCK
               for k in GGUF_BITS}
GGUF_GRIDS = tuple(GGUF_BITS)
# llama.cpp's type for a tensor whose rows are not made of 256-weight super-blocks (llama-quant.cpp: "incompatible"
# tensors; the 32-weight blocks then fit when the row is a multiple of 32): QLRConfig.for_matrix does the same
GGUF_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "iq4_xs": "iq4_nl", "iq3_xxs": "iq4_nl", "iq2_xs": "iq4_nl",
                 "iq2_s": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
# vector codebooks of Q and the bits per weight each supports: QuIP#'s E8P (lqlr.core.e8p; 2: E8P, 3 and 4: E8P +
# a 1- or 2-bit residual codebook, RVQ) and QTIP's bitshift trellis (lqlr.core.trellis)
CODEBOOK_BITS = {"e8p": (2, 3, 4), "trellis": (2, 3, 4)}
CODEBOOK_DIM = {"e8p": 8, "trellis": 16}  # input columns coded together: an E8P codeword, a trellis tile's width
TRELLIS_STATE_BITS = (4, 20)  # the range of the trellis's state bits L
TRELLIS_DEFAULT_STATE_BITS = 12  # L when not given (QTIP uses 16; time per weight grows as 2^L)
Q_GRIDS = GRIDS + GGUF_GRIDS + tuple(CODEBOOK_BITS)  # Q may also take a llama.cpp block format or a codebook


def gguf_fallback(grid: str, in_features: int) -> str | None:
    """llama.cpp's type for rows of ``in_features`` on GGUF super-block type ``grid`` when no 256-weight super-block
    fits them and 32-weight blocks do (None otherwise: the grid fits, or neither does)."""
    if grid in GGUF_FALLBACK and in_features % GGUF_SUPER_BLOCK and in_features % GGUF_BLOCK == 0:
        return GGUF_FALLBACK[grid]
    return None


def fixed_values_error(kind: str, bits: int | None, group_size: int | None, bits_name: str = "bits") -> str | None:
    """The one-line error for ``bits``/``group_size`` that disagree with GGUF type ``kind`` (None
    when they agree or are not given); ``bits_name`` names the bits argument (``bq`` in a config)."""
    bits_fixed, block = GGUF_BITS[kind], GGUF_BLOCKS[kind]
    if (bits is not None and int(bits) != bits_fixed) or (group_size is not None and int(group_size) != block):
        return (f"grid={kind!r} is a fixed GGUF format of {bits_fixed}-bit codes in blocks of {block}: set "
                f"{bits_name}={bits_fixed}, group_size={block} (got {bits_name}={bits}, group_size={group_size})")
    return None

ORDERS = ("lr_first", "q_first")
SVD_METHODS = ("auto", "exact", "randomized")
FLOAT_BITS = 16  # a factor kept as 16-bit floats instead of a low-bit grid


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass
class QLRConfig:
    """How to decompose one weight matrix W (out × in) as Q + L·R.

    Notation follows docs/design.md: Q has ``bq`` bits per entry on a grid with groups of
    ``group_size`` input columns; L (out × k) and R (k × in) have ``bl`` and ``br`` bits, with
    k = ``rank``. ``rank=0`` is Q only (LDLQ/GPTQ with a Hessian, round-to-nearest without);
    ``bl = br = 16`` keeps the factors as 16-bit floats (LoftQ / LQ-LoRA style).
    """

    bq: int = 2
    rank: int = 32
    bl: int = 4
    br: int = 4
    group_size: int = 64
    iters: int = 20
    seed: int = 0
    grid: str = "uniform"  # grid of Q: "uniform" (asymmetric, scale + zero), "nf" (NormalFloat), "e8p", "trellis" or a GGUF type
    trellis_state_bits: int = TRELLIS_DEFAULT_STATE_BITS  # grid="trellis": bits L of the trellis state (QTIP: 16; time ∝ 2^L)
    factor_grid: str = "uniform"  # grid of L and R when bl/br < 16
    factor_group_size: Optional[int] = None  # groups of L and R (null: group_size); e.g. 64 beside a per-row E8P Q
    lr_iters: int = 3  # inner alternations of the low-bit L, R fit (stops early when it stalls)
    order: str = "lr_first"  # each outer iteration: LR step then Q step, or Q step then LR step
    act_order: bool = False  # LDLQ visits input columns by decreasing diag(H)
    block_size: int = 128  # lazy-update block of LDLQ (rounded up to a multiple of group_size)
    damp: float = 0.01  # ridge δ: H + δ·mean(diag H)·I before factorising
    clip_search: bool = True  # uniform grid: pick each group's range by a small MSE search
    incoherence: bool = False  # random-sign Hadamard on both sides (QuIP/QuIP#)
    q2n: bool = False  # Q2N per-row rescale of Q toward its target under H (seed 003)
    q2n_rho: float = 0.2  # Q2N regulariser λ_i = ρ · q_i H q_iᵀ (pulls α_i toward 1)
    svd: str = "auto"  # rank-k fit: exact SVD, randomized range finder, or auto by size

    def __post_init__(self) -> None:
        _check(isinstance(self.bq, int) and 2 <= self.bq <= 8,
               f"bq={self.bq!r}: Q needs an integer bit width from 2 to 8")
        for name in ("bl", "br"):
            b = getattr(self, name)
            _check(isinstance(b, int) and (2 <= b <= 8 or b == FLOAT_BITS),
                   f"{name}={b!r}: factor bits must be an integer from 2 to 8, or 16 for 16-bit floats")
        _check(isinstance(self.rank, int) and self.rank >= 0,
               f"rank={self.rank!r}: the rank k must be an integer >= 0 (0 means Q only)")
        _check(isinstance(self.group_size, int) and self.group_size >= 1,
               f"group_size={self.group_size!r}: must be a positive integer such as 32, 64 or 128")
        _check(isinstance(self.iters, int) and self.iters >= 1,
               f"iters={self.iters!r}: need at least one outer iteration")
        _check(isinstance(self.lr_iters, int) and self.lr_iters >= 0,
               f"lr_iters={self.lr_iters!r}: must be an integer >= 0")
        _check(self.grid in Q_GRIDS, f"grid={self.grid!r}: choose one of {Q_GRIDS}")
        if self.grid in GGUF_GRIDS:
            message = fixed_values_error(self.grid, self.bq, self.group_size, bits_name="bq")
            _check(message is None, message or "")
            _check(GGUF_BLOCKS[self.grid] == GGUF_BLOCK or not (self.act_order or self.q2n),
                   f"grid={self.grid!r} (a k-quant: sub-block scales inside each super-block) does not support "
                   f"act_order or q2n yet: set act_order=false, q2n=false (got act_order={self.act_order}, q2n={self.q2n})")
        if self.grid in CODEBOOK_BITS:
            _check(self.bq in CODEBOOK_BITS[self.grid],
                   f"grid={self.grid!r} codes {CODEBOOK_BITS[self.grid]} bits per weight: set bq to one of them (got bq={self.bq})")
            dim = CODEBOOK_DIM[self.grid]
            _check(self.group_size % dim == 0,
                   f"grid={self.grid!r} encodes {dim} columns at once: group_size must be a multiple of "
                   f"{dim} (got {self.group_size}; a group at least as wide as the row means one scale per row)")
        lo, hi = TRELLIS_STATE_BITS
        _check(isinstance(self.trellis_state_bits, int) and lo <= self.trellis_state_bits <= hi
               and (self.grid != "trellis" or self.trellis_state_bits > self.bq),
               f"trellis_state_bits={self.trellis_state_bits!r}: an integer from {lo} to {hi}, above bq "
               "(16 is QTIP's; 10-12 keep a CPU run bounded)")
        _check(self.factor_grid in GRIDS, f"factor_grid={self.factor_grid!r}: choose one of {GRIDS}")
        _check(self.factor_group_size is None or (isinstance(self.factor_group_size, int) and self.factor_group_size >= 1),
               f"factor_group_size={self.factor_group_size!r}: a positive integer such as 64, or null for group_size")
        _check(self.order in ORDERS, f"order={self.order!r}: choose one of {ORDERS}")
        _check(self.svd in SVD_METHODS, f"svd={self.svd!r}: choose one of {SVD_METHODS}")
        _check(isinstance(self.block_size, int) and self.block_size >= 1,
               f"block_size={self.block_size!r}: must be a positive integer")
        _check(self.damp >= 0, f"damp={self.damp!r}: the ridge must be >= 0 (0.01 is typical)")
        _check(self.q2n_rho >= 0, f"q2n_rho={self.q2n_rho!r}: must be >= 0")
        _check(self.grid != "nf" or self.bq <= 4, f"grid='nf' supports bq 2-4, got bq={self.bq}")
        _check(self.factor_grid != "nf" or self.rank == 0 or all(b <= 4 or b == FLOAT_BITS for b in (self.bl, self.br)),
               f"factor_grid='nf' supports 2-4 bits, got bl={self.bl}, br={self.br}")

    @property
    def factor_groups(self) -> int:
        """The group size of L's and R's grids: ``factor_group_size``, or ``group_size`` when it is null."""
        return self.factor_group_size or self.group_size

    def q_bits_allowed(self) -> tuple[int, ...]:
        """The BQ values this config's grid can code, highest first (a GGUF type or a codebook fixes them)."""
        if self.grid in GGUF_GRIDS:
            return (GGUF_BITS[self.grid],)
        if self.grid in CODEBOOK_BITS:
            return tuple(sorted(CODEBOOK_BITS[self.grid], reverse=True))
        return tuple(range(4 if self.grid == "nf" else 8, 1, -1))

    def for_matrix(self, out_features: int, in_features: int) -> "QLRConfig":
        """This config as an (out × in) matrix can take it: a codebook grid needs the input width to be a
        multiple of its dimension (8 for E8P, 16 for the trellis), so a narrower-stepped matrix (stories260K's
        172-wide down_proj) falls back to the uniform grid at the same BQ and group size. A GGUF super-block type
        (the k-quants, IQ4_XS) on rows that are not a multiple of 256 but are of 32 takes llama.cpp's fallback type
        for such tensors (``GGUF_FALLBACK``: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, Q2_K/Q3_K → Q4_0, IQ4_XS → IQ4_NL), so
        SmolLM2's 576-wide matrices are written to GGUF as llama.cpp would write them."""
        if self.grid in CODEBOOK_BITS and in_features % CODEBOOK_DIM[self.grid]:
            return replace(self, grid="uniform")
        fallback = gguf_fallback(self.grid, in_features)
        if fallback is not None:
            return replace(self, grid=fallback, bq=GGUF_BITS[fallback], group_size=GGUF_BLOCK)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in manifests and result files)."""
        return asdict(self)

# groups of 256 add the cheap (2.125-bit) and the 3-bit-g256 settings; on SmolLM2-135M they lowered the
# allocator's perplexity at every budget (results/quality.json: 57.99 → 51.31 at 2.5 bits, 37.60 → 35.40 at 3)
DEFAULT_GROUPS = (64, 256)


@dataclass
class Menu:
    """``budget.mode="auto"``: the options each matrix may take, the product of these lists
    (BL = BR = ``factor_bits``; rank-0 options ignore the factor bits). ``iters``: outer iterations
    used to estimate each option's cost. ``incoherence``: None keeps the method's setting for every
    matrix; ``[False, True]`` decomposes each matrix both ways and lets the allocator pick.
    ``cost_rows``: the Q step of each cost estimate runs on this many sampled rows of a matrix
    (None: all rows, exact; see :mod:`lqlr.core.estimate`). ``grid``: None keeps the method's grid of Q;
    a list (e.g. ``[uniform, e8p]``) offers each, with the BQ and groups each can take.
    ``sensitivity_samples``: the output sensitivities from the first this many calibration sequences
    (None: all of them; the Hessians always use all)."""

    bq: list[int] = field(default_factory=lambda: [2, 3, 4])
    rank: list[int] = field(default_factory=lambda: [0, 16, 64])
    group_size: list[int] = field(default_factory=lambda: list(DEFAULT_GROUPS))
    factor_bits: list[int] = field(default_factory=lambda: [4])
    iters: int = 1
    incoherence: Optional[list[bool]] = None
    cost_rows: Optional[int] = 256
    grid: Optional[list[str]] = None
    sensitivity_samples: Optional[int] = None

    def __post_init__(self) -> None:
        if self.grid is not None:
            bad = [g for g in self.grid if g not in Q_GRIDS]
            _check(not bad, f"budget.menu.grid has {bad}: choose among {Q_GRIDS}")
        for name in ("bq", "rank", "group_size", "factor_bits", *(("incoherence",) if self.incoherence is not None else ()),
                     *(("grid",) if self.grid is not None else ())):
            _check(bool(getattr(self, name)), f"budget.menu.{name} is empty: give at least one value")
        _check(self.iters >= 1, f"budget.menu.iters={self.iters}: need at least one outer iteration")
        _check(self.cost_rows is None or self.cost_rows >= 1,
               f"budget.menu.cost_rows={self.cost_rows}: give a number of rows ≥ 1, or null for every row (exact)")
        _check(self.sensitivity_samples is None or self.sensitivity_samples >= 1,
               f"budget.menu.sensitivity_samples={self.sensitivity_samples}: give a number of sequences ≥ 1, "
               "or null for every calibration sequence")

    def options(self, base: QLRConfig, out_features: int, in_features: int) -> list[QLRConfig]:
        """Distinct valid configurations for an (out × in) matrix, built on ``base`` (grids, incoherence…)."""
        seen, out = set(), []
        rotations = [bool(r) for r in self.incoherence] if self.incoherence is not None else [base.incoherence]
        grids = self.grid if self.grid is not None else [base.grid]
        for grid, bq, k, g, fb, rot in itertools.product(grids, self.bq, self.rank, self.group_size, self.factor_bits,
                                                         rotations):
            k = min(k, out_features, in_features)
            g = min(g, in_features)  # a group wider than the row is the whole row
            if grid in GGUF_GRIDS:  # the format fixes BQ and the group: options differ in rank only
                bq, g = (base.bq, base.group_size) if base.grid == grid else (GGUF_BITS[grid], GGUF_BLOCKS[grid])
            if grid in CODEBOOK_BITS and in_features % CODEBOOK_DIM[grid]:
                grid = "uniform"  # as QLRConfig.for_matrix: this width cannot take the codebook
            fallback = gguf_fallback(grid, in_features)
            if fallback is not None:  # as QLRConfig.for_matrix: llama.cpp's type for rows without super-blocks
                grid, bq, g = fallback, GGUF_BITS[fallback], GGUF_BLOCK
            key = (grid, bq, k, g, fb if k else None, rot)
            if key in seen or (grid == "nf" and bq > 4) or (grid in CODEBOOK_BITS and (
                    bq not in CODEBOOK_BITS[grid] or g % CODEBOOK_DIM[grid])):
                continue
            seen.add(key)
            out.append(replace(base, grid=grid, bq=bq, rank=k, group_size=g, bl=fb, br=fb, iters=self.iters if k else 1,
                               incoherence=rot))
        return out


CALIBRATION_SOURCES = ("self", "wikitext2", "text", "hub")


@dataclass
class CalibrationConfig:
    """Where the calibration tokens come from: ``self`` (sampled from the model: data-free),
    ``wikitext2`` (``split`` of the shipped WikiText-2 raw), ``text`` (a file or a folder of .txt at
    ``path``) or ``hub`` (``datasets.load_dataset(hub_name, hub_config, split=split)``, streamed)."""

    source: str = "self"
    path: Optional[str] = None
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    split: str = "validation"
    text_field: str = "text"
    n_samples: int = 32
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.source in CALIBRATION_SOURCES, f"data.source={self.source!r}: choose one of {CALIBRATION_SOURCES}")
        _check(self.source != "text" or bool(self.path), "data.source=text needs data.path=<file or folder of .txt files>")
        _check(self.source != "hub" or bool(self.hub_name),
               "data.source=hub needs data.hub_name (e.g. allenai/c4) and optionally data.hub_config")
        _check(self.n_samples >= 1, f"data.n_samples={self.n_samples}: need at least one calibration sequence")
        _check(self.seq_len >= 2, f"data.seq_len={self.seq_len}: need at least 2 tokens per sequence")


BUDGET_MODES = ("uniform", "auto")
BUDGET_FITS = ("below", "nearest")
PRIORS = ("none", "intrinsic_dimension")


@dataclass
class BudgetConfig:
    """The all-in bit budget. ``bits=None``: the method's own BQ and rank. ``mode="uniform"``: every
    matrix fitted to ``bits`` on its own (``fit="below"``: at most ``bits``; ``"nearest"``: Q-only
    methods take the setting nearest to it). ``mode="auto"``: the global allocator picks one
    ``menu`` option per matrix by a MILP so that all matrices together stay within ``bits``
    (``prior="intrinsic_dimension"`` caps ranks at 2 × each block's TwoNN dimension; ``cache`` keeps
    the budget-independent cost table in ``$LQLR_CACHE`` or ``~/.cache/lqlr``). ``overrides``: ordered
    rules ``{match: pattern, **QLRConfig fields}`` fixing the matching matrices (first match wins;
    patterns as in :func:`lqlr.core.arch.matches`)."""

    bits: Optional[float] = None
    mode: str = "uniform"
    prior: str = "none"
    cache: bool = True
    fit: str = "below"
    overrides: list[Any] = field(default_factory=list)
    menu: Menu = field(default_factory=Menu)

    def __post_init__(self) -> None:
        if isinstance(self.menu, dict):
            self.menu = Menu(**self.menu)
        _check(self.bits is None or self.bits > 0,
               f"budget.bits={self.bits}: must be a positive number of all-in bits per parameter")
        _check(self.mode in BUDGET_MODES, f"budget.mode={self.mode!r}: choose one of {BUDGET_MODES}")
        _check(self.fit in BUDGET_FITS, f"budget.fit={self.fit!r}: choose one of {BUDGET_FITS}")
        _check(self.prior in PRIORS, f"budget.prior={self.prior!r}: choose one of {PRIORS}")
        _check(self.mode != "auto" or self.bits is not None,
               "budget=auto needs budget.bits: the all-in bits/param the allocator must stay within")


UNTOUCHED_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class ExportConfig:
    """How the export directory is written: ``dense_base`` adds ``dense/`` (a plain HF folder with Q
    dequantized, for tools that cannot read lqlr's packed base); ``untouched_dtype`` stores the
    tensors that are not compressed (embeddings, norms, LM head), ``float32`` keeping them bit-exact."""

    dense_base: bool = False
    untouched_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check(self.untouched_dtype in UNTOUCHED_DTYPES,
               f"export.untouched_dtype={self.untouched_dtype!r}: choose one of {UNTOUCHED_DTYPES}")


@dataclass
class EvalConfig:
    """WikiText-2 test evaluation: windows of ``seq_len`` tokens (None: min(context, 2048)), the first
    ``max_windows`` of them (None: the whole test set), ``batch_size`` windows per forward."""

    enabled: bool = True
    seq_len: Optional[int] = None
    max_windows: Optional[int] = 4
    batch_size: int = 1

    def __post_init__(self) -> None:
        _check(self.seq_len is None or self.seq_len >= 2, f"eval.seq_len={self.seq_len}: need at least 2 tokens")
        _check(self.max_windows is None or self.max_windows >= 1, f"eval.max_windows={self.max_windows}: must be >= 1")
        _check(self.batch_size >= 1, f"eval.batch_size={self.batch_size}: must be >= 1")


HESSIAN_MODES = ("sequential", "independent")


@dataclass
class CompressConfig:
    """A whole-model compression, as :func:`lqlr.compress` runs it.

    ``qlr``: the method (each matrix's decomposition, before any budget). ``targets``: which
    linears inside the decoder blocks (PEFT's ``target_modules`` convention plus globs, see
    :func:`lqlr.core.arch.matches`; None: all of them). ``hessian_mode``: ``sequential`` (block i
    sees the compressed blocks < i, GPTQ) or ``independent`` (every H from the original model,
    CALDERA). ``use_hessian=False`` decomposes under H = I (RTN, LoftQ; errors still reported under
    H). ``lm_head`` also compresses the output projection. ``lazy`` reads each block from the
    checkpoint only when it is compressed (a model name or folder; the model never whole in RAM).
    ``device``: where each decoder block's calibration forward and its matrix decompositions run
    (``auto``: CUDA when present, else the CPU; ``cpu``, ``cuda``, ``cuda:N``, ``mps``): one block
    at a time is moved there and back; with ``auto`` a matrix that runs out of GPU memory is
    decomposed again on the CPU.
    """

    qlr: QLRConfig = field(default_factory=QLRConfig)
    targets: Any = None
    hessian_mode: str = "sequential"
    batch_size: int = 8
    use_hessian: bool = True
    lm_head: bool = False
    lazy: bool = False
    device: str = "auto"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        for name, cls in (("qlr", QLRConfig), ("calibration", CalibrationConfig), ("budget", BudgetConfig),
                          ("export", ExportConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        _check(self.hessian_mode in HESSIAN_MODES, f"hessian_mode={self.hessian_mode!r}: choose one of {HESSIAN_MODES}")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size}: must be >= 1")
        check_device(self.device)
        _check(not (self.lazy and self.budget.mode == "auto" and self.budget.prior != "none"),
               f"budget.prior={self.budget.prior} runs the whole model at once, which model.lazy=true never holds: "
               "use budget.prior=none (the allocator itself runs block by block)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in manifests)."""
        return asdict(self)
