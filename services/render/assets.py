"""Avatar assets: 3D Gaussian Splatting PLY files and rig files, with validation.

PLY layout is the one written by the 3DGS reference code and read by every viewer:
binary little-endian ``vertex`` element with float properties ``x y z``, optional
``nx ny nz``, ``f_dc_0..2``, optional ``f_rest_*`` (SH degree 1..3, channel-major),
``opacity`` (logit), ``scale_0..2`` (log) and ``rot_0..3`` (quaternion w, x, y, z).

A rig (JSON, validated with pydantic) says which Gaussians belong to the jaw, lips,
eyelids and head, where the jaw hinge and neck pivots are, and how each of the 15
visemes displaces the mouth. Index and weight arrays are inline or in a companion
``.npz`` next to the JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from parley.errors import InvalidInput
from parley.visemes import VISEMES
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_GAUSSIANS = 2_000_000
#: exp(log_scale) outside this range is not a plausible avatar (scene units ~ metres).
MIN_SCALE = 1e-7
MAX_SCALE = 100.0
#: Largest PLY header we read before deciding the file is not a PLY.
_MAX_HEADER_BYTES = 64 * 1024
_SH_COEFFS = {0: 1, 1: 4, 2: 9, 3: 16}

REGIONS = ("jaw", "upper_lip", "lower_lip", "left_eyelid", "right_eyelid", "head")
RegionName = Literal["jaw", "upper_lip", "lower_lip", "left_eyelid", "right_eyelid", "head"]


class InvalidAsset(InvalidInput):
    """An avatar file (PLY or rig) that cannot be used; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class GaussianCloud:
    """3D Gaussians as torch tensors (all on one device, float32).

    means [N,3]; quats [N,4] unit (w, x, y, z); log_scales [N,3]; opacity_logits [N];
    sh [N,K,3] with K = (degree+1)^2 spherical-harmonic coefficients per colour channel.
    """

    means: torch.Tensor
    quats: torch.Tensor
    log_scales: torch.Tensor
    opacity_logits: torch.Tensor
    sh: torch.Tensor

    @property
    def num(self) -> int:
        return int(self.means.shape[0])

    @property
    def sh_degree(self) -> int:
        return round(math.sqrt(self.sh.shape[1])) - 1

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device: torch.device | str) -> GaussianCloud:
        return GaussianCloud(
            self.means.to(device),
            self.quats.to(device),
            self.log_scales.to(device),
            self.opacity_logits.to(device),
            self.sh.to(device),
        )

    def select(self, index: torch.Tensor) -> GaussianCloud:
        """Gaussians at ``index`` (a long tensor; repeats allowed)."""
        return GaussianCloud(
            self.means[index],
            self.quats[index],
            self.log_scales[index],
            self.opacity_logits[index],
            self.sh[index],
        )

    def with_means(self, means: torch.Tensor, quats: torch.Tensor | None = None) -> GaussianCloud:
        return replace(self, means=means, quats=self.quats if quats is None else quats)

    @staticmethod
    def from_numpy(
        means: np.ndarray,
        quats: np.ndarray,
        log_scales: np.ndarray,
        opacity_logits: np.ndarray,
        sh: np.ndarray,
        device: torch.device | str = "cpu",
    ) -> GaussianCloud:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

        q = t(quats)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return GaussianCloud(t(means), q, t(log_scales), t(opacity_logits), t(sh))


def validate_cloud(cloud: GaussianCloud, max_gaussians: int = MAX_GAUSSIANS) -> None:
    """Raise InvalidAsset unless the cloud is finite, non-empty, sane in scale and rotation."""
    n = cloud.num
    if n == 0:
        raise InvalidAsset("the avatar has no Gaussians")
    if n > max_gaussians:
        raise InvalidAsset(f"the avatar has {n} Gaussians; at most {max_gaussians} are accepted")
    shapes = {
        "means": (cloud.means, (n, 3)),
        "quats": (cloud.quats, (n, 4)),
        "log_scales": (cloud.log_scales, (n, 3)),
        "opacity_logits": (cloud.opacity_logits, (n,)),
    }
    for name, (tensor, shape) in shapes.items():
        if tuple(tensor.shape) != shape:
            raise InvalidAsset(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if cloud.sh.ndim != 3 or cloud.sh.shape[0] != n or cloud.sh.shape[2] != 3:
        raise InvalidAsset(f"sh has shape {tuple(cloud.sh.shape)}, expected ({n}, K, 3)")
    if cloud.sh.shape[1] not in _SH_COEFFS.values():
        raise InvalidAsset(f"sh has {cloud.sh.shape[1]} coefficients; expected 1, 4, 9 or 16")
    for name, tensor in (*((k, v[0]) for k, v in shapes.items()), ("sh", cloud.sh)):
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            row = int(bad.reshape(n, -1).any(dim=1).nonzero()[0, 0])
            raise InvalidAsset(f"{name} of Gaussian {row} is NaN or infinite")
    lo, hi = math.log(MIN_SCALE), math.log(MAX_SCALE)
    bad = (cloud.log_scales < lo) | (cloud.log_scales > hi)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        scale = cloud.log_scales[row].exp().tolist()
        raise InvalidAsset(
            f"Gaussian {row} has scale {scale}; scales must lie in [{MIN_SCALE}, {MAX_SCALE}]"
        )
    zero = cloud.quats.norm(dim=1) < 1e-8
    if bool(zero.any()):
        raise InvalidAsset(f"Gaussian {int(zero.nonzero()[0, 0])} has a zero rotation quaternion")


# --- PLY ------------------------------------------------------------------------------

_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}


@dataclass(slots=True)
class _Element:
    name: str
    count: int
    properties: list[tuple[str, str]]
    has_list: bool = False

    def dtype(self) -> np.dtype[Any]:
        return np.dtype([(name, "<" + kind) for name, kind in self.properties])


def _parse_header(raw: bytes, path: Path) -> tuple[list[_Element], int]:
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply\n") and not raw.startswith(b"ply\r\n"):
        raise InvalidAsset(f"{path.name}: not a PLY file (no 'ply' magic line)")
    if end < 0:
        raise InvalidAsset(f"{path.name}: malformed PLY header (no 'end_header' line)")
    try:
        lines = raw[:end].decode("ascii").splitlines()[1:]
    except UnicodeDecodeError as e:
        raise InvalidAsset(f"{path.name}: malformed PLY header (not ASCII)") from e
    elements: list[_Element] = []
    fmt = None
    for number, line in enumerate(lines, start=2):
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        try:
            if words[0] == "format":
                fmt = words[1]
                if len(words) != 3 or words[2] != "1.0":
                    raise ValueError("expected 'format <kind> 1.0'")
            elif words[0] == "element":
                count = int(words[2])
                if len(words) != 3 or count < 0:
                    raise ValueError("expected 'element <name> <count>'")
                elements.append(_Element(words[1], count, []))
            elif words[0] == "property":
                if not elements:
                    raise ValueError("property before any element")
                if words[1] == "list":
                    elements[-1].has_list = True
                    continue
                if len(words) != 3 or words[1] not in _PLY_TYPES:
                    raise ValueError(f"unknown property type {words[1]!r}")
                elements[-1].properties.append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise ValueError(f"unknown keyword {words[0]!r}")
        except (IndexError, ValueError) as e:
            raise InvalidAsset(
                f"{path.name}: malformed PLY header at line {number} ({line!r}): {e}"
            ) from e
    if fmt is None:
        raise InvalidAsset(f"{path.name}: malformed PLY header (no 'format' line)")
    if fmt != "binary_little_endian":
        raise InvalidAsset(
            f"{path.name}: PLY format {fmt!r} is not supported; save it as binary_little_endian"
        )
    return elements, end + len(b"end_header\n")


def load_ply(path: str | Path, max_gaussians: int = MAX_GAUSSIANS) -> GaussianCloud:
    """Read a 3DGS PLY file into a validated, CPU GaussianCloud (quaternions normalised)."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(_MAX_HEADER_BYTES)
        elements, data_start = _parse_header(head, path)
        offset = data_start
        vertex = None
        for element in elements:
            if element.name == "vertex":
                vertex = element
                break
            if element.has_list:
                raise InvalidAsset(
                    f"{path.name}: list properties before 'vertex' are not supported"
                )
            offset += element.count * element.dtype().itemsize
        if vertex is None:
            raise InvalidAsset(f"{path.name}: no 'vertex' element")
        if vertex.has_list:
            raise InvalidAsset(f"{path.name}: 'vertex' has list properties; not a 3DGS file")
        if vertex.count == 0:
            raise InvalidAsset(f"{path.name}: the avatar has no Gaussians")
        if vertex.count > max_gaussians:
            raise InvalidAsset(
                f"{path.name}: {vertex.count} Gaussians; at most {max_gaussians} are accepted"
            )
        names = [name for name, _ in vertex.properties]
        if len(set(names)) != len(names):
            raise InvalidAsset(f"{path.name}: duplicate vertex properties")
        required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
        required += [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
        missing = [name for name in required if name not in names]
        if missing:
            raise InvalidAsset(f"{path.name}: missing vertex properties {missing}")
        rest = sorted(
            (name for name in names if name.startswith("f_rest_")), key=lambda s: int(s[7:])
        )
        if rest != [f"f_rest_{i}" for i in range(len(rest))]:
            raise InvalidAsset(f"{path.name}: f_rest_* properties are not numbered 0..M-1")
        degree = next((d for d, k in _SH_COEFFS.items() if 3 * (k - 1) == len(rest)), None)
        if degree is None:
            raise InvalidAsset(
                f"{path.name}: {len(rest)} f_rest_* properties; expected 0, 9, 24 or 45"
            )
        dtype = vertex.dtype()
        f.seek(offset)
        data = np.fromfile(f, dtype=dtype, count=vertex.count)
    if data.shape[0] != vertex.count:
        raise InvalidAsset(
            f"{path.name}: truncated: header declares {vertex.count} Gaussians, "
            f"data holds {data.shape[0]}"
        )

    def cols(*keys: str) -> np.ndarray:
        return np.stack([data[k].astype(np.float32) for k in keys], axis=1)

    k = _SH_COEFFS[degree]
    dc = cols("f_dc_0", "f_dc_1", "f_dc_2")[:, None, :]
    if rest:
        # 3DGS writes the higher coefficients channel-major: [N, 3, K-1] flattened.
        extra = cols(*rest).reshape(-1, 3, k - 1).transpose(0, 2, 1)
        sh = np.concatenate([dc, extra], axis=1)
    else:
        sh = dc
    quats = cols("rot_0", "rot_1", "rot_2", "rot_3")
    means = cols("x", "y", "z")
    log_scales = cols("scale_0", "scale_1", "scale_2")
    opacity = data["opacity"].astype(np.float32)
    raw = GaussianCloud(*(torch.from_numpy(a) for a in (means, quats, log_scales, opacity, sh)))
    validate_cloud(raw, max_gaussians)
    return raw.with_means(raw.means, raw.quats / raw.quats.norm(dim=1, keepdim=True))


def save_ply(cloud: GaussianCloud, path: str | Path, normals: bool = True) -> None:
    """Write the cloud as a binary little-endian 3DGS PLY (float32 properties)."""
    validate_cloud(cloud)
    n, k = cloud.num, cloud.sh.shape[1]
    names = ["x", "y", "z"] + (["nx", "ny", "nz"] if normals else [])
    names += [f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(3 * (k - 1))]
    names += ["opacity"] + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)]
    sh = cloud.sh.detach().cpu().numpy().astype(np.float32)
    parts = [cloud.means.detach().cpu().numpy()]
    if normals:
        parts.append(np.zeros((n, 3), np.float32))
    parts += [sh[:, 0, :], sh[:, 1:, :].transpose(0, 2, 1).reshape(n, -1)]
    parts += [cloud.opacity_logits.detach().cpu().numpy()[:, None]]
    parts += [cloud.log_scales.detach().cpu().numpy(), cloud.quats.detach().cpu().numpy()]
    table = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype="<f4")
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {name}" for name in names] + ["end_header"]
    with Path(path).open("wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(table.tobytes())


# --- rig --------------------------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
Vec3 = tuple[float, float, float]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class LipOffset(BaseModel):
    """Displacement of one lip in a viseme (scene units, avatar's canonical frame)."""

    model_config = _STRICT
    translate: Vec3 = (0.0, 0.0, 0.0)
    #: Relative widening about the mouth centre (+0.2 = 20 % wider, -0.3 = rounded).
    stretch_x: float = Field(default=0.0, ge=-0.9, le=2.0)

    @field_validator("translate")
    @classmethod
    def _small(cls, v: Vec3) -> Vec3:
        if max(abs(c) for c in v) > 1.0:
            raise ValueError("lip translation above 1 scene unit")
        return v


class VisemeTarget(BaseModel):
    """Blend target of one viseme: jaw opening and per-lip displacement."""

    model_config = _STRICT
    jaw_open: Fraction = 0.0
    upper_lip: LipOffset = LipOffset()
    lower_lip: LipOffset = LipOffset()


class EyeRig(BaseModel):
    """An eyelid rotates about the eye centre's x axis; authored closed.

    Open, its Gaussians are squeezed towards ``lid_top_deg`` (elevation above the eye's
    forward axis) to ``open_fraction`` of their closed angular span.
    """

    model_config = _STRICT
    centre: Vec3
    lid_top_deg: float = Field(ge=-90.0, le=90.0)
    open_fraction: Fraction = 0.2


class Pivots(BaseModel):
    model_config = _STRICT
    jaw_hinge: Vec3
    neck: Vec3
    mouth_centre: Vec3


class JawRig(BaseModel):
    model_config = _STRICT
    axis: Vec3 = (1.0, 0.0, 0.0)
    max_angle_deg: float = Field(default=12.0, gt=0.0, le=45.0)

    @field_validator("axis")
    @classmethod
    def _nonzero(cls, v: Vec3) -> Vec3:
        if math.hypot(*v) < 1e-6:
            raise ValueError("jaw axis is zero")
        return v


class RegionSpec(BaseModel):
    """Gaussian indices of a region (inline list, or key into the companion .npz) and
    optional per-Gaussian weights in [0, 1] (default 1)."""

    model_config = _STRICT
    indices: list[int] | str
    weights: list[float] | str | None = None


class RigDocument(BaseModel):
    """The rig JSON file."""

    model_config = _STRICT
    format: Literal["parley-rig"] = "parley-rig"
    version: Literal[1] = 1
    num_gaussians: int = Field(ge=1, le=MAX_GAUSSIANS)
    #: Companion .npz holding index/weight arrays, relative to the JSON file.
    arrays: str | None = None
    regions: dict[RegionName, RegionSpec]
    pivots: Pivots
    jaw: JawRig = JawRig()
    eyes: dict[Literal["left", "right"], EyeRig]
    visemes: dict[str, VisemeTarget]

    @model_validator(mode="after")
    def _complete(self) -> RigDocument:
        missing = [r for r in REGIONS if r not in self.regions]
        if missing:
            raise ValueError(f"regions {missing} are missing")
        if set(self.eyes) != {"left", "right"}:
            raise ValueError("eyes must have 'left' and 'right'")
        unknown = sorted(set(self.visemes) - set(VISEMES))
        if unknown:
            raise ValueError(f"unknown visemes {unknown}; expected {list(VISEMES)}")
        absent = [v for v in VISEMES if v not in self.visemes]
        if absent:
            raise ValueError(f"visemes {absent} are missing")
        return self


@dataclass(frozen=True, slots=True)
class Region:
    """Gaussians of one rig region: int64 indices and float32 weights in [0, 1]."""

    indices: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True, slots=True)
class Rig:
    """A validated rig with its arrays loaded."""

    num_gaussians: int
    regions: dict[str, Region]
    pivots: Pivots
    jaw: JawRig
    eyes: dict[str, EyeRig]
    visemes: dict[str, VisemeTarget]

    def select(self, index: np.ndarray) -> Rig:
        """The rig of ``cloud.select(index)`` (index may repeat Gaussians)."""
        index = np.asarray(index, dtype=np.int64)
        regions = {}
        for name, region in self.regions.items():
            dense = np.full(self.num_gaussians, -1.0, np.float32)
            dense[region.indices] = region.weights
            picked = dense[index]
            keep = np.nonzero(picked >= 0)[0]
            regions[name] = Region(keep.astype(np.int64), picked[keep])
        return replace(self, num_gaussians=len(index), regions=regions)


def _region_arrays(name: str, spec: RegionSpec, arrays: dict[str, np.ndarray], n: int) -> Region:
    def lookup(value: list[Any] | str, what: str) -> np.ndarray:
        if isinstance(value, str):
            if value not in arrays:
                raise InvalidAsset(f"rig region {name!r}: {what} array {value!r} not found")
            return np.asarray(arrays[value])
        return np.asarray(value)

    indices = lookup(spec.indices, "index")
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise InvalidAsset(f"rig region {name!r}: indices must be a 1-D integer array")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise InvalidAsset(
            f"rig region {name!r}: indices out of range [0, {n}) "
            f"(min {indices.min()}, max {indices.max()})"
        )
    if np.unique(indices).size != indices.size:
        raise InvalidAsset(f"rig region {name!r}: duplicate indices")
    if spec.weights is None:
        weights = np.ones(indices.size, np.float32)
    else:
        weights = lookup(spec.weights, "weight").astype(np.float32)
        if weights.shape != indices.shape:
            raise InvalidAsset(
                f"rig region {name!r}: {weights.size} weights for {indices.size} indices"
            )
        if (
            not np.all(np.isfinite(weights))
            or weights.min(initial=0) < 0
            or weights.max(initial=0) > 1
        ):
            raise InvalidAsset(f"rig region {name!r}: weights must be finite and in [0, 1]")
    return Region(indices, weights)


def rig_from_document(doc: RigDocument, arrays: dict[str, np.ndarray] | None = None) -> Rig:
    """Check a rig document's arrays and build the Rig."""
    arrays = arrays or {}
    regions = {
        name: _region_arrays(name, doc.regions[name], arrays, doc.num_gaussians)  # type: ignore[index]
        for name in REGIONS
    }
    return Rig(
        doc.num_gaussians,
        regions,
        doc.pivots,
        doc.jaw,
        {str(k): v for k, v in doc.eyes.items()},
        dict(doc.visemes),
    )


def load_rig(path: str | Path) -> Rig:
    """Read and validate a rig JSON file (and its companion .npz, if it names one)."""
    path = Path(path)
    try:
        doc = RigDocument.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise InvalidAsset(f"{path.name}: invalid rig: {e}") from e
    arrays: dict[str, np.ndarray] = {}
    if doc.arrays is not None:
        companion = path.parent / doc.arrays
        if Path(doc.arrays).is_absolute() or ".." in Path(doc.arrays).parts:
            raise InvalidAsset(f"{path.name}: 'arrays' must be a file next to the rig")
        try:
            with np.load(companion, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as e:
            raise InvalidAsset(f"{path.name}: cannot read rig arrays {doc.arrays!r}: {e}") from e
    return rig_from_document(doc, arrays)


def save_rig(rig: Rig, path: str | Path) -> None:
    """Write the rig as JSON plus a companion ``<name>.npz`` with its arrays."""
    path = Path(path)
    companion = path.with_suffix(".npz")
    arrays: dict[str, np.ndarray] = {}
    regions = {}
    for name, region in rig.regions.items():
        arrays[f"{name}_indices"] = region.indices
        arrays[f"{name}_weights"] = region.weights
        regions[name] = RegionSpec(indices=f"{name}_indices", weights=f"{name}_weights")
    doc = RigDocument(
        num_gaussians=rig.num_gaussians,
        arrays=companion.name,
        regions=regions,  # type: ignore[arg-type]
        pivots=rig.pivots,
        jaw=rig.jaw,
        eyes=rig.eyes,  # type: ignore[arg-type]
        visemes=rig.visemes,
    )
    np.savez(companion, **arrays)  # type: ignore[arg-type]
    path.write_text(json.dumps(doc.model_dump(mode="json"), indent=1))


@dataclass(frozen=True, slots=True)
class Avatar:
    """A Gaussian cloud and the rig that animates it."""

    avatar_id: str
    cloud: GaussianCloud
    rig: Rig

    def __post_init__(self) -> None:
        if self.rig.num_gaussians != self.cloud.num:
            raise InvalidAsset(
                f"avatar {self.avatar_id!r}: rig is for {self.rig.num_gaussians} Gaussians, "
                f"the cloud has {self.cloud.num}"
            )

    def select(self, index: torch.Tensor) -> Avatar:
        """Avatar made of the Gaussians at ``index`` (repeats allowed), rig remapped."""
        return Avatar(
            self.avatar_id, self.cloud.select(index), self.rig.select(index.cpu().numpy())
        )


def load_avatar(avatar_id: str, ply_path: str | Path, rig_path: str | Path) -> Avatar:
    """Load and cross-check a PLY and its rig."""
    return Avatar(avatar_id, load_ply(ply_path), load_rig(rig_path))
