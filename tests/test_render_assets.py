"""Avatar assets: PLY round trip and validation, rig files, the generated default avatar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from parley.errors import InvalidInput
from parley.visemes import VISEMES

from services.render.assets import (
    REGIONS,
    Avatar,
    GaussianCloud,
    InvalidAsset,
    load_avatar,
    load_ply,
    load_rig,
    save_ply,
    save_rig,
)
from services.render.default_avatar import AVATAR_ID, build_default_avatar


def random_cloud(n: int, degree: int, seed: int = 0) -> GaussianCloud:
    g = torch.Generator().manual_seed(seed)
    quats = torch.randn(n, 4, generator=g)
    return GaussianCloud(
        means=torch.randn(n, 3, generator=g),
        quats=quats / quats.norm(dim=1, keepdim=True),
        log_scales=torch.rand(n, 3, generator=g) * 4 - 6,
        opacity_logits=torch.randn(n, generator=g),
        sh=torch.randn(n, (degree + 1) ** 2, 3, generator=g),
    )


def write_ply(
    path: Path,
    columns: dict[str, np.ndarray],
    count: int | None = None,
    fmt: str = "binary_little_endian",
    truncate: int = 0,
    header_extra: str = "",
) -> Path:
    """A PLY written field by field, the way 3DGS tools do (float32 properties)."""
    names = list(columns)
    n = len(next(iter(columns.values()))) if count is None else count
    header = f"ply\nformat {fmt} 1.0\nelement vertex {n}\n"
    header += "".join(f"property float {name}\n" for name in names)
    header += header_extra + "end_header\n"
    table = np.stack([columns[name] for name in names], axis=1).astype("<f4")
    data = table.tobytes()
    path.write_bytes(header.encode() + data[: len(data) - truncate])
    return path


def valid_columns(n: int = 5, rest: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    cols = {k: rng.normal(size=n) for k in ("x", "y", "z", "nx", "ny", "nz")}
    cols |= {f"f_dc_{i}": rng.normal(size=n) for i in range(3)}
    cols |= {f"f_rest_{i}": rng.normal(size=n) for i in range(rest)}
    cols["opacity"] = rng.normal(size=n)
    cols |= {f"scale_{i}": rng.uniform(-6, -2, size=n) for i in range(3)}
    cols |= {f"rot_{i}": rng.normal(size=n) for i in range(4)}
    return cols


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_ply_round_trip(tmp_path: Path, degree: int) -> None:
    cloud = random_cloud(257, degree)
    path = tmp_path / "avatar.ply"
    save_ply(cloud, path)
    loaded = load_ply(path)
    assert loaded.num == 257 and loaded.sh_degree == degree
    for name in ("means", "log_scales", "opacity_logits", "sh"):
        assert torch.equal(getattr(loaded, name), getattr(cloud, name)), name
    torch.testing.assert_close(loaded.quats, cloud.quats, rtol=0, atol=1e-6)


def test_ply_reads_3dgs_channel_major_sh_and_normalises_quaternions(tmp_path: Path) -> None:
    cols = valid_columns(n=3, rest=9)
    cols["rot_0"], cols["rot_1"], cols["rot_2"], cols["rot_3"] = (
        np.full(3, v) for v in (2, 0, 0, 0)
    )
    cloud = load_ply(write_ply(tmp_path / "a.ply", cols, header_extra="comment from 3dgs\n"))
    # f_rest is [3 channels x 3 coefficients]: f_rest_4 is channel 1 (green), coefficient 2.
    assert cloud.sh.shape == (3, 4, 3)
    np.testing.assert_allclose(cloud.sh[:, 2, 1].numpy(), cols["f_rest_4"].astype(np.float32))
    np.testing.assert_allclose(cloud.sh[:, 0, 2].numpy(), cols["f_dc_2"].astype(np.float32))
    torch.testing.assert_close(cloud.quats, torch.tensor([[1.0, 0, 0, 0]]).expand(3, 4))


def _remove(name: str) -> dict[str, np.ndarray]:
    cols = valid_columns()
    del cols[name]
    return cols


def _set(name: str, row: int, value: float) -> dict[str, np.ndarray]:
    cols = valid_columns()
    cols[name][row] = value
    return cols


def _zero_quat() -> dict[str, np.ndarray]:
    cols = valid_columns()
    for i in range(4):
        cols[f"rot_{i}"][2] = 0.0
    return cols


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"columns": valid_columns(), "fmt": "ascii"}, "binary_little_endian"),
        ({"columns": valid_columns(), "fmt": "binary_big_endian"}, "binary_little_endian"),
        ({"columns": valid_columns(), "truncate": 7}, "truncated"),
        ({"columns": valid_columns(), "count": 0}, "no Gaussians"),
        ({"columns": _remove("opacity")}, "missing vertex properties ['opacity']"),
        ({"columns": _remove("rot_3")}, "rot_3"),
        ({"columns": valid_columns(rest=5)}, "f_rest"),
        ({"columns": _set("x", 1, math.nan)}, "NaN or infinite"),
        ({"columns": _set("f_dc_1", 4, math.inf)}, "NaN or infinite"),
        ({"columns": _set("scale_1", 0, math.log(1000.0))}, "scale"),
        ({"columns": _set("scale_2", 3, math.log(1e-9))}, "scale"),
        ({"columns": _zero_quat()}, "zero rotation quaternion"),
        ({"columns": valid_columns(), "header_extra": "property float x\n"}, "duplicate"),
        ({"columns": valid_columns(), "header_extra": "property half q\n"}, "malformed PLY header"),
    ],
)
def test_ply_validation(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = write_ply(tmp_path / "bad.ply", **kwargs)
    with pytest.raises(InvalidAsset, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        load_ply(path)
    assert isinstance(e.value, InvalidInput)


def test_ply_rejects_non_ply_and_missing_header_end(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ply"
    junk.write_bytes(b"\x89PNG\r\n" + bytes(100))
    with pytest.raises(InvalidAsset, match="not a PLY"):
        load_ply(junk)
    open_ended = tmp_path / "open.ply"
    open_ended.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\n")
    with pytest.raises(InvalidAsset, match="end_header"):
        load_ply(open_ended)


def test_ply_count_limit_is_checked_before_reading(tmp_path: Path) -> None:
    # The header claims 3M Gaussians but holds 5: rejected on the count, not truncation.
    path = write_ply(tmp_path / "huge.ply", valid_columns(), count=3_000_000)
    with pytest.raises(InvalidAsset, match="at most 2000000"):
        load_ply(path)
    with pytest.raises(InvalidAsset, match="at most 4"):
        load_ply(write_ply(tmp_path / "five.ply", valid_columns()), max_gaussians=4)


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return build_default_avatar()


def test_default_avatar_is_big_deterministic_and_fast(avatar: Avatar) -> None:
    start = time.perf_counter()
    again = build_default_avatar()
    assert time.perf_counter() - start < 2.0
    assert avatar.avatar_id == AVATAR_ID == "default"
    assert avatar.cloud.num >= 20_000
    assert torch.equal(again.cloud.means, avatar.cloud.means)
    assert torch.equal(again.cloud.sh, avatar.cloud.sh)
    for name in REGIONS:
        assert len(avatar.rig.regions[name].indices) > 0, name
    assert set(avatar.rig.visemes) == set(VISEMES)


def test_avatar_files_round_trip(tmp_path: Path, avatar: Avatar) -> None:
    save_ply(avatar.cloud, tmp_path / "default.ply")
    save_rig(avatar.rig, tmp_path / "default.rig.json")
    assert (tmp_path / "default.rig.npz").exists()
    loaded = load_avatar("copy", tmp_path / "default.ply", tmp_path / "default.rig.json")
    assert torch.equal(loaded.cloud.means, avatar.cloud.means)
    for name in REGIONS:
        np.testing.assert_array_equal(
            loaded.rig.regions[name].indices, avatar.rig.regions[name].indices
        )
        np.testing.assert_array_equal(
            loaded.rig.regions[name].weights, avatar.rig.regions[name].weights
        )
    assert loaded.rig.visemes == avatar.rig.visemes
    assert loaded.rig.pivots == avatar.rig.pivots
    assert loaded.rig.eyes == avatar.rig.eyes


def test_avatar_select_remaps_the_rig(avatar: Avatar) -> None:
    index = torch.arange(0, avatar.cloud.num, 3)
    small = avatar.select(index)
    jaw = avatar.rig.regions["jaw"]
    expected = np.isin(index.numpy(), jaw.indices).sum()
    assert len(small.rig.regions["jaw"].indices) == expected
    assert small.rig.num_gaussians == small.cloud.num == len(index)


def inline_rig(n: int = 10) -> dict:
    region = {"indices": [0, 1], "weights": [1.0, 0.5]}
    return {
        "format": "parley-rig",
        "version": 1,
        "num_gaussians": n,
        "regions": {name: dict(region) for name in REGIONS},
        "pivots": {"jaw_hinge": [0, 0, 0], "neck": [0, -1, 0], "mouth_centre": [0, 0, 1]},
        "eyes": {
            "left": {"centre": [1, 0, 0], "lid_top_deg": 30},
            "right": {"centre": [-1, 0, 0], "lid_top_deg": 30},
        },
        "visemes": {v: {"jaw_open": 0.5} for v in VISEMES},
    }


def test_inline_rig_loads(tmp_path: Path) -> None:
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(inline_rig()))
    rig = load_rig(path)
    np.testing.assert_array_equal(rig.regions["head"].indices, [0, 1])
    np.testing.assert_allclose(rig.regions["head"].weights, [1.0, 0.5])
    assert rig.visemes["aa"].jaw_open == 0.5


def _edit(change: str) -> dict:
    doc = inline_rig()
    if change == "index out of range":
        doc["regions"]["jaw"]["indices"] = [0, 10]
    elif change == "negative index":
        doc["regions"]["jaw"]["indices"] = [-1, 2]
    elif change == "duplicate":
        doc["regions"]["jaw"]["indices"] = [3, 3]
    elif change == "missing region":
        del doc["regions"]["left_eyelid"]
    elif change == "missing viseme":
        del doc["visemes"]["PP"]
    elif change == "unknown viseme":
        doc["visemes"]["zz"] = {}
    elif change == "weights length":
        doc["regions"]["head"]["weights"] = [1.0]
    elif change == "weight above 1":
        doc["regions"]["head"]["weights"] = [1.0, 1.5]
    elif change == "jaw open above 1":
        doc["visemes"]["aa"]["jaw_open"] = 2.0
    elif change == "zero jaw axis":
        doc["jaw"] = {"axis": [0, 0, 0]}
    elif change == "unknown field":
        doc["extra"] = 1
    elif change == "missing npz":
        doc["arrays"] = "nope.npz"
        doc["regions"]["jaw"]["indices"] = "jaw_indices"
    elif change == "npz outside":
        doc["arrays"] = "../elsewhere.npz"
    elif change == "NaN pivot":
        doc["pivots"]["neck"] = [0.0, math.nan, 0.0]
    return doc


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("index out of range", "out of range"),
        ("negative index", "out of range"),
        ("duplicate", "duplicate"),
        ("missing region", "left_eyelid"),
        ("missing viseme", "PP"),
        ("unknown viseme", "zz"),
        ("weights length", "1 weights for 2 indices"),
        ("weight above 1", r"\[0, 1\]"),
        ("jaw open above 1", "jaw_open"),
        ("zero jaw axis", "axis"),
        ("unknown field", "extra"),
        ("missing npz", "nope.npz"),
        ("npz outside", "next to the rig"),
        ("NaN pivot", "finite"),
    ],
)
def test_rig_validation(tmp_path: Path, change: str, message: str) -> None:
    path = tmp_path / "rig.json"
    path.write_text(json.dumps(_edit(change)))
    with pytest.raises(InvalidAsset, match=message):
        load_rig(path)


def test_rig_must_match_the_cloud(tmp_path: Path) -> None:
    save_ply(random_cloud(12, 0), tmp_path / "a.ply")
    (tmp_path / "rig.json").write_text(json.dumps(inline_rig(n=10)))
    with pytest.raises(InvalidAsset, match="rig is for 10 Gaussians"):
        load_avatar("x", tmp_path / "a.ply", tmp_path / "rig.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidAsset, match="invalid rig"):
        load_rig(tmp_path / "bad.json")
