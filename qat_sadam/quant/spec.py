"""What one quantizer does: bit width, integer range, granularity and how its scale is set."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

SCALE_MODES = ("lsq", "observer", "frozen")
WEIGHT_BITS = tuple(range(2, 9))  # integer kernels take int8 weights (4-bit ones stored as INT4 at export)
BITS = WEIGHT_BITS + (16,)  # activations: the uint8 container below 8 bits, or uint16 (NPUs' A16)
INITS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """A fake-quantizer specification.

    scale_mode:
      - "lsq": the scale is a learnable parameter (Esser et al., LSQ), initialised from data;
      - "observer": the scale follows the data, an EMA of the per-batch estimate with
        ``observer_momentum`` (1.0 = the current tensor on every forward, the paper's scheme);
      - "frozen": set once by calibration, then fixed.
    max_level: the integer level that the observed max|x| maps to (default: qmax). The paper
      maps max|x| to 1.5 at 2 bits, which clips the top level; recipes reproduce it with this.
    fixed_scale: a scale that data never changes, with the zero point at qmin: for outputs whose
      range is known (a softmax's [0, 1] at 1/2^bits, what ORT's QLinearSoftmax assumes).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0
    narrow_range: bool = False
    init: str = "minmax"
    percentile: float = 99.99
    scale_mode: str = "lsq"
    observer_momentum: float = 0.01
    max_level: float | None = None
    scale_floor: float = 1e-8
    fixed_scale: float | None = None

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits must be an integer from 2 to 8, or 16, got {self.bits!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown scale init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"unknown scale_mode {self.scale_mode!r}; choose one of {', '.join(SCALE_MODES)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not 0.0 < self.observer_momentum <= 1.0:
            raise ValueError(f"observer_momentum must be in (0, 1], got {self.observer_momentum}")
        if self.scale_floor <= 0:
            raise ValueError(f"scale_floor must be positive, got {self.scale_floor}")
        if self.max_level is not None and self.max_level <= 0:
            raise ValueError(f"max_level must be positive, got {self.max_level}")
        if self.fixed_scale is not None and (self.fixed_scale <= 0 or self.scale_mode != "frozen"):
            raise ValueError(
                f"fixed_scale must be positive and go with scale_mode 'frozen', got {self.fixed_scale}, "
                f"{self.scale_mode!r}"
            )

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + int(self.narrow_range)

    @property
    def qmax(self) -> int:
        if not self.signed:
            return 2**self.bits - 1 - int(self.narrow_range)
        return 2 ** (self.bits - 1) - 1

    def with_(self, **changes) -> "QuantSpec":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "quantizer") -> "QuantSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        return cls(**d)
