"""Tile-based EWA splatting of 3D Gaussians in torch (any device), gsplat on CUDA.

The torch path is built for CPUs: after projection and binning, each round composites
the next ``chunk`` depth-sorted Gaussians of every still-active tile as dense
[tiles, chunk, pixels] tensors. A Gaussian's exponent is a quadratic in the pixel
coordinates, so one matrix product evaluates it for all pixels; transmittance is a
cumulative product along the chunk. Tiles drop out when every pixel is opaque
(transmittance < 1e-4) or their list is exhausted. Per-Gaussian and per-pair data are
kept as rows (structure of arrays): torch's CPU kernels are several times faster on
long rows than on [N, 3]-shaped tensors.

Model (shared with ``reference_render``): alpha = min(0.99, opacity * exp(-d^T S^-1 d / 2))
with S the projected covariance plus 0.3 px^2; alpha < 1/255 is skipped; front-to-back
compositing over the Gaussians' camera depth stops once transmittance < 1e-4 (after the
Gaussian that crossed it; 3DGS drops that one, which differs by at most 0.01 at such
pixels); pixel (row i, column j) has its centre at (j + 0.5, i + 0.5); u = fx x/z + cx.
A Gaussian's support is the exact ellipse where alpha >= 1/255 (about 3.3 sigma for
opaque ones) rather than a 3-sigma circle, so nothing is truncated and tiles are
assigned by an exact ellipse-rectangle test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from services.render.assets import GaussianCloud

#: Low-pass dilation of every projected covariance (px^2), as in 3DGS.
DILATION = 0.3
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
#: Projected mean offsets are clamped to this multiple of the half field of view when
#: linearising the projection, as in 3DGS (keeps off-screen Gaussians from exploding).
FOV_CLAMP = 1.3
_LOG2E = 1.0 / math.log(2.0)

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792)
SH_C2_4 = 0.5462742152960396
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


@dataclass(frozen=True, slots=True)
class Camera:
    """Pinhole camera. ``view`` is the 4x4 world-to-camera matrix in OpenCV axes
    (x right, y down, z forward)."""

    view: torch.Tensor
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    near: float = 0.01
    far: float = 1000.0

    @staticmethod
    def look_at(
        eye: Sequence[float],
        target: Sequence[float],
        fov_y_deg: float,
        width: int,
        height: int,
        up: Sequence[float] = (0.0, 1.0, 0.0),
    ) -> Camera:
        """Camera at ``eye`` looking at ``target`` with square pixels."""
        e = np.asarray(eye, np.float64)
        forward = np.asarray(target, np.float64) - e
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, np.asarray(up, np.float64))
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        view = np.eye(4)
        view[:3, :3] = np.stack([right, down, forward])
        view[:3, 3] = -view[:3, :3] @ e
        f = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
        return Camera(
            torch.tensor(view, dtype=torch.float32), f, f, width / 2, height / 2, width, height
        )

    def to(self, device: torch.device | str) -> Camera:
        return Camera(
            self.view.to(device),
            self.fx,
            self.fy,
            self.cx,
            self.cy,
            self.width,
            self.height,
            self.near,
            self.far,
        )

    @property
    def position(self) -> torch.Tensor:
        """Camera centre in world coordinates."""
        rot, t = self.view[:3, :3], self.view[:3, 3]
        return -rot.T @ t

    def intrinsics(self) -> torch.Tensor:
        return torch.tensor(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]],
            dtype=torch.float32,
            device=self.view.device,
        )


@dataclass(frozen=True, slots=True)
class RasterSettings:
    """Options of the rasterizer."""

    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Tile edge in pixels (binning and per-round batches). 16 is the CUDA rasterizers'
    #: choice; on CPUs 8 is faster because every pixel of a tile is evaluated densely for
    #: every Gaussian (measured, 20k-Gaussian head, one core: 21 vs 40 ms at 256 px,
    #: 51 vs 61 ms at 512 px).
    tile_size: int = 8
    #: Gaussians per tile composited per round (between early-termination checks).
    chunk: int = 32
    #: Upper bound of tiles x chunk x pixels evaluated in one batch; sized so the
    #: intermediate tensors stay in a CPU's L2 cache.
    batch_elements: int = 1 << 18
    #: "auto": gsplat when the cloud is on CUDA and gsplat is installed, else torch.
    backend: Literal["auto", "torch", "gsplat"] = "auto"


@dataclass(frozen=True, slots=True)
class RenderOutput:
    """image [H,W,3] float in [0,1]; alpha [H,W] (1 - final transmittance)."""

    image: torch.Tensor
    alpha: torch.Tensor

    def to_uint8(self) -> np.ndarray:
        """HxWx3 uint8 RGB on the CPU."""
        return (self.image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [N,3,3] of unit quaternions [N,4] (w, x, y, z)."""
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


def eval_sh(sh: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """RGB [N,3] of SH coefficients [N,K,3] seen along unit directions [N,3] (3DGS basis)."""
    rgb = SH_C0 * sh[:, 0]
    k = sh.shape[1]
    if k > 1:
        x, y, z = (d[:, None] for d in dirs.unbind(-1))
        rgb = rgb - SH_C1 * y * sh[:, 1] + SH_C1 * z * sh[:, 2] - SH_C1 * x * sh[:, 3]
        if k > 4:
            xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
            rgb = (
                rgb
                + SH_C2[0] * xy * sh[:, 4]
                + SH_C2[1] * yz * sh[:, 5]
                + SH_C2[2] * (2 * zz - xx - yy) * sh[:, 6]
                + SH_C2[3] * xz * sh[:, 7]
                + SH_C2_4 * (xx - yy) * sh[:, 8]
            )
            if k > 9:
                rgb = (
                    rgb
                    + SH_C3[0] * y * (3 * xx - yy) * sh[:, 9]
                    + SH_C3[1] * xy * z * sh[:, 10]
                    + SH_C3[2] * y * (4 * zz - xx - yy) * sh[:, 11]
                    + SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[:, 12]
                    + SH_C3[4] * x * (4 * zz - xx - yy) * sh[:, 13]
                    + SH_C3[5] * z * (xx - yy) * sh[:, 14]
                    + SH_C3[6] * x * (xx - 3 * yy) * sh[:, 15]
                )
    return (rgb + 0.5).clamp_min(0.0)


@dataclass(frozen=True, slots=True)
class Projected:
    """Screen-space Gaussians that touch at least one pixel centre (in cloud order).

    Stored as rows (structure of arrays, [18, M]) because the CPU kernels are much faster
    on long contiguous rows than on [M, 3]-shaped tensors.
    """

    ids: torch.Tensor  # [M] indices into the cloud
    #: u, v, depth, cov xx, xy, yy (dilated), conic a, b, c, opacity, radius (3 sigma of
    #: the major axis), bbox x0, y0, x1, y1 (inclusive pixels of the alpha >= 1/255
    #: ellipse), r, g, b.
    rows: torch.Tensor

    @property
    def mean2d(self) -> torch.Tensor:
        return self.rows[0:2].T

    @property
    def depth(self) -> torch.Tensor:
        return self.rows[2]

    @property
    def cov2d(self) -> torch.Tensor:
        return self.rows[3:6].T

    @property
    def conic(self) -> torch.Tensor:
        return self.rows[6:9].T

    @property
    def opacity(self) -> torch.Tensor:
        return self.rows[9]

    @property
    def radius(self) -> torch.Tensor:
        return self.rows[10]

    @property
    def bbox(self) -> torch.Tensor:
        return self.rows[11:15].T.long()

    @property
    def rgb(self) -> torch.Tensor:
        return self.rows[15:18].T


# Rotation matrix entries (row-major) as linear combinations of the 16 ordered products
# q_i q_j of a unit quaternion (w, x, y, z), so one outer product and one matrix product
# give every Gaussian's rotation.
_ROT_FROM_OUTER = np.zeros((16, 9), np.float32)
for _entry, _terms in enumerate(
    [
        {(0, 0): 1, (1, 1): 1, (2, 2): -1, (3, 3): -1},
        {(1, 2): 2, (0, 3): -2},
        {(1, 3): 2, (0, 2): 2},
        {(1, 2): 2, (0, 3): 2},
        {(0, 0): 1, (1, 1): -1, (2, 2): 1, (3, 3): -1},
        {(2, 3): 2, (0, 1): -2},
        {(1, 3): 2, (0, 2): -2},
        {(2, 3): 2, (0, 1): 2},
        {(0, 0): 1, (1, 1): -1, (2, 2): -1, (3, 3): 1},
    ]
):
    for (_i, _j), _c in _terms.items():
        _ROT_FROM_OUTER[4 * _i + _j, _entry] += _c / 2
        _ROT_FROM_OUTER[4 * _j + _i, _entry] += _c / 2


def _rotmat_to_quat(m: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) of one rotation matrix (Shepperd's method)."""
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = 2.0 * math.sqrt(1.0 + tr)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    out = np.asarray(q, np.float64)
    return out / np.linalg.norm(out)


def _left_quat_matrix(q: np.ndarray) -> np.ndarray:
    """L with q ⊗ p == L @ p."""
    w, x, y, z = q
    return np.array([[w, -x, -y, -z], [x, w, -z, y], [y, z, w, -x], [z, -y, x, w]])


def project(cloud: GaussianCloud, camera: Camera) -> Projected:
    """EWA projection: linearise the pinhole at each mean, cull, colour."""
    device, dtype = cloud.means.device, cloud.means.dtype
    view_np = camera.view.detach().cpu().double().numpy()

    def const(a: np.ndarray | list[float]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

    x, y, z = torch.addmm(const(view_np[:3, 3:]), const(view_np[:3, :3]), cloud.means.T)
    opacity = torch.sigmoid(cloud.opacity_logits)

    # Rotation of each Gaussian in camera space: q_view ⊗ q via one 4x4 product, then its
    # matrix from the quaternion's outer product via one 9x16 product (no per-Gaussian bmm).
    q = torch.mm(const(_left_quat_matrix(_rotmat_to_quat(view_np[:3, :3]))), cloud.quats.T)
    q = q * torch.rsqrt((q * q).sum(0).clamp_min(1e-24))
    outer = (q[:, None, :] * q[None, :, :]).view(16, -1)
    rot = torch.mm(torch.as_tensor(_ROT_FROM_OUTER.T, device=device), outer).view(3, 3, -1)
    m = rot * cloud.log_scales.T.exp()[None, :, :]

    inv_z = 1.0 / z
    lim_x = FOV_CLAMP * max(camera.cx, camera.width - camera.cx) / camera.fx
    lim_y = FOV_CLAMP * max(camera.cy, camera.height - camera.cy) / camera.fy
    tx, ty = x * inv_z, y * inv_z
    # Rows of the Jacobian times m: f/z (m_x - t_x m_z), with t clamped as in 3DGS.
    j0 = (m[0] - tx.clamp(-lim_x, lim_x) * m[2]) * (camera.fx * inv_z)
    j1 = (m[1] - ty.clamp(-lim_y, lim_y) * m[2]) * (camera.fy * inv_z)
    sxx = (j0 * j0).sum(0) + DILATION
    sxy = (j0 * j1).sum(0)
    syy = (j1 * j1).sum(0) + DILATION
    det = sxx * syy - sxy * sxy
    u = tx * camera.fx + camera.cx
    v = ty * camera.fy + camera.cy
    # alpha >= 1/255  <=>  d^T S^-1 d <= k2: the support is an exact ellipse.
    k2 = 2.0 * torch.log(opacity.clamp_min(ALPHA_MIN) * 255.0)
    rx, ry = (k2 * sxx).sqrt(), (k2 * syy).sqrt()
    x0 = torch.ceil(u - rx - 0.5).clamp_min(0)
    x1 = torch.floor(u + rx - 0.5).clamp_max(camera.width - 1)
    y0 = torch.ceil(v - ry - 0.5).clamp_min(0)
    y1 = torch.floor(v + ry - 0.5).clamp_max(camera.height - 1)
    # In front of the camera, not transparent, and some pixel centre inside the support
    # (this drops off-screen and sub-pixel Gaussians).
    on = (x0 <= x1) & (y0 <= y1) & (z > camera.near) & (z < camera.far)
    on &= (opacity > ALPHA_MIN) & (det > 0)
    ids = on.nonzero().squeeze(1)

    inv_det = 1.0 / det
    radius = 3.0 * (0.5 * (sxx + syy) + ((0.5 * (sxx - syy)) ** 2 + sxy * sxy).sqrt()).sqrt()
    conic = (syy * inv_det, -sxy * inv_det, sxx * inv_det)
    rows = torch.stack(
        [u, v, z, sxx, sxy, syy, *conic, opacity, radius, x0, y0, x1, y1]
    ).index_select(1, ids)
    sh = cloud.sh.index_select(0, ids)
    if sh.shape[1] == 1:
        rgb = (SH_C0 * sh[:, 0] + 0.5).clamp_min(0.0)
    else:
        dirs = cloud.means.index_select(0, ids) - camera.position.to(device=device, dtype=dtype)
        rgb = eval_sh(sh, dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return Projected(ids=ids, rows=torch.cat([rows, rgb.T]))


class Rasterizer:
    """Renders GaussianClouds; keeps per-device constants between frames."""

    def __init__(self, settings: RasterSettings | None = None) -> None:
        self.settings = settings or RasterSettings()
        if self.settings.tile_size < 1 or self.settings.chunk < 1:
            raise ValueError("tile_size and chunk must be positive")
        self._basis: dict[torch.device, torch.Tensor] = {}
        #: Counters of the last torch render: visible Gaussians, (tile, Gaussian) pairs,
        #: rounds and Gaussian-pixel evaluations.
        self.last_stats: dict[str, int] = {}

    def render(self, cloud: GaussianCloud, camera: Camera) -> RenderOutput:
        backend = self.settings.backend
        if backend == "gsplat" or (backend == "auto" and cloud.means.is_cuda):
            out = _render_gsplat(cloud, camera, self.settings.background)
            if out is not None:
                return out
            if backend == "gsplat":
                raise RuntimeError("gsplat is not installed or the cloud is not on CUDA")
        with torch.inference_mode():
            return self._render_torch(cloud, camera)

    def _pixel_basis(self, device: torch.device) -> torch.Tensor:
        """[6, P] monomials (1, x, y, x^2, xy, y^2) of the pixel centres of one tile."""
        basis = self._basis.get(device)
        if basis is None:
            ts = self.settings.tile_size
            c = torch.arange(ts, dtype=torch.float32, device=device) + 0.5
            y, x = torch.meshgrid(c, c, indexing="ij")
            x, y = x.reshape(-1), y.reshape(-1)
            basis = torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y])
            self._basis[device] = basis
        return basis

    def _render_torch(self, cloud: GaussianCloud, camera: Camera) -> RenderOutput:
        s = self.settings
        device = cloud.means.device
        ts = s.tile_size
        width, height = camera.width, camera.height
        tiles_x, tiles_y = -(-width // ts), -(-height // ts)
        num_tiles = tiles_x * tiles_y
        npix = ts * ts

        proj = project(cloud, camera)
        pairs_tile, pairs_g = _bin_to_tiles(proj, ts, tiles_x, width, height)
        self.last_stats = {
            "visible": int(proj.ids.numel()),
            "pairs": int(pairs_tile.numel()),
            "rounds": 0,
            "evaluations": 0,
        }
        out = torch.zeros(num_tiles, 3, npix, device=device)
        trans = torch.ones(num_tiles, npix, device=device)
        if pairs_tile.numel() > 0:
            table = _pair_table(proj, pairs_tile, pairs_g, ts, tiles_x)
            counts = torch.bincount(pairs_tile, minlength=num_tiles)
            self._composite(table, counts, out, trans)

        bg = torch.tensor(s.background, dtype=torch.float32, device=device)
        image = torch.addcmul(out, trans[:, None, :], bg[None, :, None])
        image = image.view(tiles_y, tiles_x, 3, ts, ts).permute(0, 3, 1, 4, 2)
        image = image.reshape(tiles_y * ts, tiles_x * ts, 3)[:height, :width]
        alpha = (1.0 - trans).view(tiles_y, tiles_x, ts, ts).permute(0, 2, 1, 3)
        alpha = alpha.reshape(tiles_y * ts, tiles_x * ts)[:height, :width]
        return RenderOutput(image.contiguous(), alpha.contiguous())

    def _composite(
        self, table: torch.Tensor, counts: torch.Tensor, out: torch.Tensor, trans: torch.Tensor
    ) -> None:
        """Front-to-back compositing, ``chunk`` Gaussians per active tile per round.

        ``table`` columns are (exponent coefficients c0..c5, r, g, b) of the (tile,
        Gaussian) pairs, grouped by tile, front to back; its last column is a pad.
        """
        device = table.device
        chunk = self.settings.chunk
        basis = self._pixel_basis(device)
        npix = basis.shape[1]
        pad = table.shape[1] - 1
        lane = torch.arange(chunk, device=device)
        starts = counts.cumsum(0) - counts
        ends = starts + counts
        per_batch = max(1, self.settings.batch_elements // (chunk * npix))
        active = (counts > 0).nonzero().squeeze(1)
        k = 0
        stats = self.last_stats
        while active.numel() > 0:
            stats["rounds"] += 1
            stats["evaluations"] += active.numel() * chunk * npix
            for part in active.split(per_batch):
                n = part.numel()
                idx = starts[part, None] + (k + lane)
                idx = torch.where(idx < ends[part, None], idx, pad).view(-1)
                cols = table.index_select(1, idx)
                power = torch.mm(cols[:6].T, basis).view(n, chunk, npix)
                alpha = F.threshold(power.exp2_().clamp_max_(ALPHA_MAX), ALPHA_MIN, 0.0)
                # buf[:, 0] = transmittance before this chunk; cumprod gives it after each.
                buf = torch.empty(n, chunk + 1, npix, device=device)
                torch.index_select(trans, 0, part, out=buf[:, 0])
                torch.sub(1.0, alpha, out=buf[:, 1:])
                t_after = torch.cumprod(buf, dim=1)
                weights = alpha.mul_(t_after[:, :-1])
                colour = torch.bmm(cols[6:].view(3, n, chunk).transpose(0, 1), weights)
                out.index_add_(0, part, colour)
                trans.index_copy_(0, part, t_after[:, -1])
            k += chunk
            alive = (counts[active] > k) & (trans.index_select(0, active).amax(dim=1) >= T_MIN)
            active = active[alive]


def _bin_to_tiles(
    proj: Projected, ts: int, tiles_x: int, width: int, height: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile, Gaussian) pairs for every tile whose pixel centres the Gaussian's support
    ellipse reaches, sorted by tile and, within a tile, front to back."""
    device = proj.rows.device
    m = proj.ids.shape[0]
    if m == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    rows = proj.rows
    # Integer arithmetic in float32 is exact here (values < 2^24) and faster than int64.
    t0 = torch.floor(rows[11:13] / ts)
    span = torch.floor(rows[13:15] / ts) - t0 + 1
    counts = (span[0] * span[1]).long()
    g = torch.repeat_interleave(torch.arange(m, device=device), counts)
    first = counts.cumsum(0) - counts
    local = (torch.arange(g.shape[0], device=device) - first.index_select(0, g)).float()
    k2 = 2.0 * torch.log(rows[9] * 255.0)
    # Per pair: box x0, y0, width; mean u, v; conic a, b, c; k2.
    per = torch.cat([t0, span[:1], rows[0:2], rows[6:9], k2[None]]).index_select(1, g)
    row = torch.floor(local / per[2])
    tx = per[0] + (local - row * per[2])
    ty = per[1] + row
    keep = _ellipse_meets_tile(per[3:], tx, ty, ts, width, height)
    # Rejected pairs get tile id `tiles` so they sort to the end and are cut off, which is
    # cheaper than compacting before the sort.
    tiles = tiles_x * -(-height // ts)
    tile = torch.where(keep, ty * tiles_x + tx, float(tiles)).long()
    # Positive float32 depths order like their bit patterns read as integers.
    depth_bits = rows[2].contiguous().view(torch.int32).long()
    key = tile * (1 << 32) + depth_bits.index_select(0, g)
    key, order = torch.sort(key)
    kept = int(keep.sum())
    return key[:kept] >> 32, g.index_select(0, order[:kept])


def _ellipse_meets_tile(
    per: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, ts: int, width: int, height: int
) -> torch.Tensor:
    """Whether the support ellipse d^T S^-1 d <= k2 contains a point of the rectangle
    spanned by the tile's pixel centres (a bounding box alone keeps ~10-20 % more pairs).

    The quadratic is convex, so its minimum over the rectangle is on the line x = clamp(u)
    (optimised over y) or on the line y = clamp(v) (optimised over x); both are inside
    the rectangle, so the smaller of the two is the exact minimum.
    """
    u, v, a, b, c, k2 = per
    x0, y0 = tx * ts + 0.5, ty * ts + 0.5
    x1 = torch.clamp_max(x0 + (ts - 1), width - 0.5)
    y1 = torch.clamp_max(y0 + (ts - 1), height - 0.5)
    dx = torch.minimum(torch.maximum(u, x0), x1) - u
    dy = torch.minimum(torch.maximum(-b * dx / c, y0 - v), y1 - v)
    best = (a * dx + 2 * b * dy) * dx + c * dy * dy
    dy = torch.minimum(torch.maximum(v, y0), y1) - v
    dx = torch.minimum(torch.maximum(-b * dy / a, x0 - u), x1 - u)
    best = torch.minimum(best, (a * dx + 2 * b * dy) * dx + c * dy * dy)
    return best <= k2


def _pair_table(
    proj: Projected, pairs_tile: torch.Tensor, pairs_g: torch.Tensor, ts: int, tiles_x: int
) -> torch.Tensor:
    """[9, pairs + 1]: per (tile, Gaussian) pair the coefficients c0..c5 of its base-2
    log-alpha as a quadratic c0 + c1 x + c2 y + c3 x^2 + c4 xy + c5 y^2 in tile-local
    pixel coordinates, then its r, g, b; the last column is an invisible pad.

    Base 2 because torch's CPU exp2 is an order of magnitude faster than exp.
    """
    device = proj.rows.device
    n = pairs_g.shape[0]
    rows = proj.rows
    conic = rows[6:9] * _LOG2E
    per_gaussian = torch.cat(
        [rows[0:2], conic, torch.log2(rows[9])[None], conic * -0.5, rows[15:18]]
    )
    per_gaussian[7] *= 2.0  # the xy coefficient is -b, not -b/2
    per = per_gaussian.index_select(1, pairs_g)
    table = torch.empty(9, n + 1, device=device)
    table[3:, :n] = per[6:]
    # float64: the terms cancel for long, thin Gaussians far from the tile origin (float32
    # errs by ~0.3 % in alpha for a 200 px long needle 400 px away); the coefficients are
    # small again afterwards, so float32 is fine for the per-pixel work.
    tile = pairs_tile.double()
    oy = torch.floor(tile / tiles_x)
    dx = per[0].double() - (tile - oy * tiles_x) * ts
    dy = per[1].double() - oy * ts
    a, b, c = per[2].double(), per[3].double(), per[4].double()
    c1 = a * dx + b * dy
    c2 = b * dx + c * dy
    table[0, :n] = per[5].double() - 0.5 * (dx * c1 + dy * c2)
    table[1, :n] = c1
    table[2, :n] = c2
    # Pad column: exp2(-1e4) == 0, so padded lanes add nothing.
    table[:, n] = 0.0
    table[0, n] = -1e4
    return table


def _render_gsplat(
    cloud: GaussianCloud, camera: Camera, background: tuple[float, float, float]
) -> RenderOutput | None:
    """gsplat's CUDA rasterizer: same dilation, alpha clamp and thresholds, but it bins
    by a 3-sigma radius, so faint fringes can differ by about 1/255 from the torch path.

    Returns None when gsplat is not installed or the cloud is not on CUDA. Not exercised
    by the tests (no CUDA in CI).
    """
    if not cloud.means.is_cuda:
        return None
    try:
        from gsplat import rasterization
    except ImportError:
        return None
    device = cloud.means.device
    with torch.inference_mode():
        colours, alphas, _ = rasterization(
            means=cloud.means,
            quats=cloud.quats,
            scales=cloud.log_scales.exp(),
            opacities=torch.sigmoid(cloud.opacity_logits),
            colors=cloud.sh,
            viewmats=camera.view.to(device)[None],
            Ks=camera.intrinsics().to(device)[None],
            width=camera.width,
            height=camera.height,
            near_plane=camera.near,
            far_plane=camera.far,
            sh_degree=cloud.sh_degree,
            eps2d=DILATION,
            backgrounds=torch.tensor(background, device=device, dtype=torch.float32)[None],
        )
    return RenderOutput(colours[0].clamp(0, 1), alphas[0, ..., 0])


def render(
    cloud: GaussianCloud, camera: Camera, settings: RasterSettings | None = None
) -> RenderOutput:
    """Render once (use a Rasterizer to reuse per-device constants across frames)."""
    return Rasterizer(settings).render(cloud, camera)


def reference_render(
    cloud: GaussianCloud,
    camera: Camera,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Slow, plain per-Gaussian reference (float64 numpy, whole image per Gaussian).

    Same model as the fast path; used by tests to bound its error. Returns [H,W,3].
    """
    means = cloud.means.detach().cpu().double().numpy()
    quats = cloud.quats.detach().cpu().double().numpy()
    scales = np.exp(cloud.log_scales.detach().cpu().double().numpy())
    opac = 1.0 / (1.0 + np.exp(-cloud.opacity_logits.detach().cpu().double().numpy()))
    view = camera.view.detach().cpu().double().numpy()
    rot, trans = view[:3, :3], view[:3, 3]
    cam_pos = -rot.T @ trans
    dirs = means - cam_pos
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    colours = (
        eval_sh(cloud.sh.detach().cpu().double(), torch.from_numpy(dirs)).numpy().astype(np.float64)
    )
    h, w = camera.height, camera.width
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    image = np.zeros((h, w, 3))
    transmittance = np.ones((h, w))
    done = np.zeros((h, w), dtype=bool)
    lim_x = FOV_CLAMP * max(camera.cx, w - camera.cx) / camera.fx
    lim_y = FOV_CLAMP * max(camera.cy, h - camera.cy) / camera.fy
    depths = means @ rot[2] + trans[2]
    for i in np.argsort(depths, kind="stable"):
        x, y, z = rot @ means[i] + trans
        if not camera.near < z < camera.far or opac[i] <= ALPHA_MIN:
            continue
        qw, qx, qy, qz = quats[i]
        r_g = np.array(
            [
                [1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)],
                [2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx)],
                [2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy)],
            ]
        )
        cov3 = r_g @ np.diag(scales[i] ** 2) @ r_g.T
        tx = np.clip(x / z, -lim_x, lim_x) * z
        ty = np.clip(y / z, -lim_y, lim_y) * z
        jac = np.array(
            [
                [camera.fx / z, 0.0, -camera.fx * tx / (z * z)],
                [0.0, camera.fy / z, -camera.fy * ty / (z * z)],
            ]
        )
        cov2 = jac @ rot @ cov3 @ rot.T @ jac.T + DILATION * np.eye(2)
        if np.linalg.det(cov2) <= 0:
            continue
        inv = np.linalg.inv(cov2)
        dx = xs - (camera.fx * x / z + camera.cx)
        dy = ys - (camera.fy * y / z + camera.cy)
        q = inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy * dy
        alpha = np.minimum(ALPHA_MAX, opac[i] * np.exp(-0.5 * q))
        alpha[(alpha < ALPHA_MIN) | done] = 0.0
        image += (alpha * transmittance)[..., None] * colours[i]
        transmittance *= 1.0 - alpha
        done |= transmittance < T_MIN
    return image + transmittance[..., None] * np.asarray(background)
