"""Format v1 manifest: JSON round trip, strict decoding, and validation that reports every problem."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zero_core.layout import GroupLayout, compute_partition_numel
from zero_ckpt.errors import CheckpointError, LayoutMismatchError, ManifestError, Problem
from zero_ckpt.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_FILE_NAME,
    FileMeta,
    GroupMeta,
    Manifest,
    ParamMeta,
    check_manifest,
    shard_path,
    tensor_name,
)

PATH = "s3://bucket/run1/step-1200/manifest.json"
CRC = "crc32c:0a1b2c3d"

DEFAULT_GROUPS = (
    [("encoder.weight", (4, 3), "bfloat16"), ("encoder.bias", (3,), "bfloat16")],
    [("head.weight", (5,), "float32"), ("head.scale", (), "float32")],
)


def make_group(params, world_size, align=1, **kw) -> GroupMeta:
    """A consistent GroupMeta: offsets from GroupLayout.build, partition size from the layout math."""
    layout = GroupLayout.build([(n, s, d) for n, s, d, *_ in params], world_size=world_size, align=align)
    aliases = [tuple(rest[0]) if rest else () for _, _, _, *rest in params]
    return GroupMeta(
        numel=layout.numel,
        partition_numel=compute_partition_numel(layout.numel, world_size, align),
        align=align,
        params=tuple(
            ParamMeta(p.name, p.shape, p.dtype, p.offset, a) for p, a in zip(layout.params, aliases)
        ),
        **kw,
    )


def make_manifest(groups=DEFAULT_GROUPS, world_size=2, align=1, **kw) -> Manifest:
    defaults = dict(
        world_size=world_size,
        zero_stage=2,
        master_dtype="float32",
        groups=tuple(make_group(g, world_size, align) for g in groups),
        shards=tuple(
            FileMeta(shard_path(r, world_size), 100 + r, CRC, r) for r in range(world_size)
        ),
    )
    defaults.update(kw)
    return Manifest(**defaults)


def rich_manifest() -> Manifest:
    """Every optional field set to something non-default."""
    g0 = make_group(
        [
            ("embed.weight", (10, 4), "bfloat16", ("lm_head.weight", "decoder.embed.weight")),
            ("norm.weight", (4,), "bfloat16"),
            ("empty", (0, 4), "float16"),
        ],
        world_size=3,
        align=8,
        state_keys=("exp_avg", "exp_avg_sq"),
        hyperparams={"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                     "amsgrad": False, "foreach": None},
        scalars={"step": 1200},
        state_dtypes={"exp_avg_sq": "bfloat16"},
    )
    g1 = make_group(
        [("scale", (), "float32")],
        world_size=3,
        align=1,
        state_keys=("momentum_buffer",),
        hyperparams={"lr": 0.1, "momentum": 0.9},
    )
    return Manifest(
        world_size=3,
        zero_stage=1,
        master_dtype="float32",
        groups=(g0, g1),
        shards=tuple(
            FileMeta(
                shard_path(r, 3),
                1000 + r,
                f"crc32c:{r:08x}",
                r,
                {tensor_name(0, "master"): "crc32c:deadbeef", tensor_name(1, "momentum_buffer"): "crc32c:00000000"},
            )
            for r in range(3)
        ),
        model_file=FileMeta(MODEL_FILE_NAME, 4096, "crc32c:ffffffff", None, {"buf": "crc32c:12345678"}),
        extra={"loss_scaler": {"scale": 65536.0}, "averager": {"step": 1200}, "user": {"note": "é ✓"}},
        created_by="zero-ckpt 0.1.0",
    )


def replace_group(m: Manifest, gi: int, **changes) -> Manifest:
    groups = list(m.groups)
    groups[gi] = dataclasses.replace(groups[gi], **changes)
    return dataclasses.replace(m, groups=tuple(groups))


def replace_param(m: Manifest, gi: int, pi: int, **changes) -> Manifest:
    params = list(m.groups[gi].params)
    params[pi] = dataclasses.replace(params[pi], **changes)
    return replace_group(m, gi, params=tuple(params))


def replace_shard(m: Manifest, index: int, **changes) -> Manifest:
    shards = list(m.shards)
    shards[index] = dataclasses.replace(shards[index], **changes)
    return dataclasses.replace(m, shards=tuple(shards))


def only_problem(m: Manifest) -> Problem:
    problems = check_manifest(m, PATH)
    assert len(problems) == 1, problems
    (p,) = problems
    assert p.path == PATH
    assert p.kind == "manifest"
    return p


# ----- helpers and small API ----------------------------------------------------------------


def test_helper_builds_valid_manifests():
    assert check_manifest(make_manifest()) == []
    assert check_manifest(rich_manifest()) == []
    for ws in (1, 3, 7, 64):
        for align in (1, 3, 64):
            assert check_manifest(make_manifest(world_size=ws, align=align)) == []
    m = make_manifest()
    assert m.validate() is m
    assert m.groups[0].partition_numel == 8  # 15 elements at ws 2 -> ceil(15 / 2)
    assert m.groups[1].numel == 6 and m.groups[1].partition_numel == 3


def test_names_and_paths():
    assert shard_path(3, 8) == "shards/rank-00003-of-00008.safetensors"
    assert shard_path(0, 65536) == "shards/rank-00000-of-65536.safetensors"
    with pytest.raises(LayoutMismatchError, match="65536"):  # MAX_WORLD_SIZE
        shard_path(0, 65537)
    assert tensor_name(1, "exp_avg") == "g1.exp_avg"
    assert (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME) == ("zero-ckpt", 1, "manifest.json")


def test_convenience_accessors():
    m = rich_manifest()
    assert m.shard(2).rank == 2 and m.shard(2).path == shard_path(2, 3)
    with pytest.raises(KeyError):
        m.shard(3)
    assert m.param_index() == {
        "embed.weight": (0, 0),
        "lm_head.weight": (0, 0),
        "decoder.embed.weight": (0, 0),
        "norm.weight": (0, 1),
        "empty": (0, 2),
        "scale": (1, 0),
    }
    assert m.total_numel == 44 + 1
    assert m.shard_bytes == 1000 + 1001 + 1002
    assert m.step == 1200
    assert make_manifest().step is None
    assert m.groups[0].keys == ("master", "exp_avg", "exp_avg_sq")
    assert m.groups[0].dtype_of("master", "float32") == "float32"
    assert m.groups[0].dtype_of("exp_avg", "float32") == "float32"
    assert m.groups[0].dtype_of("exp_avg_sq", "float32") == "bfloat16"
    layouts = m.layouts()
    assert [(l.world_size, l.partition_numel) for l in layouts] == [(3, 16), (3, 1)]
    assert [(l.world_size, l.partition_numel) for l in m.layouts(5)] == [(5, 16), (5, 1)]


# ----- JSON round trip ------------------------------------------------------------------------


def test_round_trip_rich():
    m = rich_manifest()
    text = m.to_json()
    back = Manifest.from_json(text, PATH)
    assert back == m
    assert back.to_json() == text
    assert Manifest.from_json(text.encode("utf-8"), PATH) == m
    # Spot-check fields that a lax decoder would drop.
    assert back.groups[0].params[0].aliases == ("lm_head.weight", "decoder.embed.weight")
    assert back.groups[0].state_dtypes == {"exp_avg_sq": "bfloat16"}
    assert back.shards[1].tensors == {"g0.master": "crc32c:deadbeef", "g1.momentum_buffer": "crc32c:00000000"}
    assert back.model_file == FileMeta("model.safetensors", 4096, "crc32c:ffffffff", None, {"buf": "crc32c:12345678"})
    assert back.extra["user"]["note"] == "é ✓"
    assert back.created_by == "zero-ckpt 0.1.0"
    assert back.groups[1].params[0].shape == ()


def test_round_trip_minimal_and_json_shape():
    m = make_manifest()
    doc = json.loads(m.to_json())
    assert doc["format"] == "zero-ckpt" and doc["version"] == 1
    assert doc["model_file"] is None
    assert doc["shards"][0] == {"rank": 0, "path": "shards/rank-00000-of-00002.safetensors", "bytes": 100, "checksum": CRC}
    assert doc["groups"][0]["params"][1] == {"name": "encoder.bias", "shape": [3], "dtype": "bfloat16", "offset": 12}
    assert "aliases" not in doc["groups"][0]["params"][0]
    assert Manifest.from_json(m.to_json()) == m


def test_to_json_refuses_nan():
    m = make_manifest(extra={"x": float("nan")})
    with pytest.raises(ValueError):
        m.to_json()


# Control characters (category Cc: C0, DEL, C1) are refused in a manifest.
NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**60), 2**60), st.floats(allow_nan=False, allow_infinity=False), NAMES
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(NAMES, inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(NAMES, min_size=1, max_size=6, unique=True),
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=3).map(tuple), min_size=6, max_size=6),
    world_size=st.integers(1, 9),
    align=st.integers(1, 70),
    extra=st.dictionaries(NAMES, JSON_VALUES, max_size=3),
    hyper=st.dictionaries(NAMES, JSON_VALUES, max_size=3),
    crcs=st.lists(st.integers(0, 2**32 - 1), min_size=9, max_size=9),
)
def test_round_trip_property(names, shapes, world_size, align, extra, hyper, crcs):
    group = make_group(
        [(n, s, "float32") for n, s in zip(names, shapes)], world_size, align, hyperparams=hyper
    )
    m = Manifest(
        world_size=world_size,
        zero_stage=2,
        master_dtype="bfloat16",
        groups=(group,),
        shards=tuple(
            FileMeta(shard_path(r, world_size), r, f"crc32c:{crcs[r]:08x}", r) for r in range(world_size)
        ),
        extra=extra,
    )
    assert check_manifest(m) == []
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert back.to_json() == m.to_json()


# ----- validation: one problem at a time ----------------------------------------------------


def test_problem_offsets_not_contiguous():
    m = make_manifest()
    # encoder.bias moved from 12 to 13; numel and partition size follow so only offsets are wrong.
    m = replace_param(m, 0, 1, offset=13)
    m = replace_group(m, 0, numel=16, partition_numel=8)
    p = only_problem(m)
    assert "groups[0].params[1] ('encoder.bias') has offset 13" in p.message
    assert "previous params end at 12" in p.message
    assert "contiguous" in p.message


def test_problem_first_offset_not_zero():
    m = make_manifest()
    m = replace_param(m, 1, 0, offset=1)
    m = replace_param(m, 1, 1, offset=6)
    m = replace_group(m, 1, numel=7, partition_numel=4)
    p = only_problem(m)
    assert "groups[1].params[0] ('head.weight') has offset 1 but the previous params end at 0" in p.message


def test_problem_numel_mismatch():
    m = replace_group(make_manifest(), 1, numel=7, partition_numel=4)
    p = only_problem(m)
    assert p.message == "groups[1].numel is 7 but its params add up to 6 elements"


@pytest.mark.parametrize("wrong", [0, 7, 9, 16])
def test_problem_partition_numel(wrong):
    m = replace_group(make_manifest(), 0, partition_numel=wrong)
    p = only_problem(m)
    assert p.message == (
        f"groups[0].partition_numel is {wrong}, expected 8 = ceil(15 / (2 * 1)) * 1"
    )


def test_problem_partition_numel_with_align():
    m = make_manifest(world_size=4, align=64)
    assert m.groups[0].partition_numel == 64
    m = replace_group(m, 0, partition_numel=4)  # the align-1 answer: align was forgotten
    p = only_problem(m)
    assert "groups[0].partition_numel is 4, expected 64" in p.message


def test_problem_align():
    m = replace_group(make_manifest(), 0, align=0)
    p = only_problem(m)
    assert p.message == "groups[0].align is 0; it must be at least 1"


def test_problem_shard_count():
    m = make_manifest(world_size=3)
    m = dataclasses.replace(m, shards=m.shards[:2])
    p = only_problem(m)
    assert "lists 2 shards but world_size is 3" in p.message


def test_problem_shard_count_too_many():
    m = make_manifest(world_size=2)
    m = dataclasses.replace(m, shards=m.shards + (FileMeta("shards/extra.safetensors", 1, CRC, 2),))
    p = only_problem(m)
    assert "lists 3 shards but world_size is 2" in p.message


@pytest.mark.parametrize(
    "ranks",
    [
        [0, 0, 2],  # duplicate (and 1 missing)
        [0, 1, 3],  # 2 missing, 3 out of range
        [1, 2, 3],  # 0 missing
        [0, None, 2],  # a shard without rank
        [-1, 0, 1],
    ],
)
def test_problem_duplicate_or_missing_ranks(ranks):
    m = make_manifest(world_size=3)
    m = dataclasses.replace(
        m, shards=tuple(dataclasses.replace(s, rank=r) for s, r in zip(m.shards, ranks))
    )
    p = only_problem(m)
    assert p.message == f"shard ranks are {ranks}; expected each of 0..2 exactly once"


def test_ranks_in_any_order_are_fine():
    m = make_manifest(world_size=3)
    m = dataclasses.replace(m, shards=tuple(reversed(m.shards)))
    assert check_manifest(m) == []


def test_problem_duplicate_param_name_in_group():
    m = replace_param(make_manifest(), 0, 1, name="encoder.weight")
    p = only_problem(m)
    assert "groups[0].params[1] ('encoder.weight'): name 'encoder.weight' appears more than once" in p.message


def test_problem_duplicate_param_name_across_groups():
    m = replace_param(make_manifest(), 1, 0, name="encoder.bias")
    p = only_problem(m)
    assert "groups[1].params[0] ('encoder.bias'): name 'encoder.bias' appears more than once" in p.message


def test_problem_alias_duplicates_a_name():
    m = replace_param(make_manifest(), 1, 0, aliases=("encoder.weight",))
    p = only_problem(m)
    assert "groups[1].params[0] ('head.weight'): name 'encoder.weight' appears more than once" in p.message


def test_problem_alias_repeated():
    m = replace_param(make_manifest(), 0, 0, aliases=("tied", "tied"))
    p = only_problem(m)
    assert "name 'tied' appears more than once" in p.message


def test_problem_param_dtype():
    m = replace_param(make_manifest(), 0, 1, dtype="float33")
    p = only_problem(m)
    assert p.message == "groups[0].params[1] ('encoder.bias') has unknown dtype 'float33'"


@pytest.mark.parametrize("dtype", ["int8", "float", "torch.float32", "F32", ""])
def test_problem_master_dtype(dtype):
    p = only_problem(make_manifest(master_dtype=dtype))
    assert p.message.startswith(f"master_dtype is {dtype!r}; expected one of")


def test_problem_state_dtypes_and_keys():
    m = replace_group(make_manifest(), 0, state_keys=("exp_avg",), state_dtypes={"exp_avg": "float128"})
    p = only_problem(m)
    assert p.message == "groups[0].state_dtypes['exp_avg'] is unknown dtype 'float128'"

    m = replace_group(make_manifest(), 0, state_keys=("exp_avg",), state_dtypes={"exp_avg_sq": "float32"})
    p = only_problem(m)
    assert p.message == "groups[0].state_dtypes names 'exp_avg_sq', which is not in state_keys ['exp_avg']"

    for keys in (("exp_avg", "exp_avg"), ("master",)):
        p = only_problem(replace_group(make_manifest(), 0, state_keys=keys))
        assert p.message == f"groups[0].state_keys {list(keys)} must be unique and must not contain 'master'"


def test_problem_negative_dimension():
    # (-1, -3) has a positive product (3, like the true (3,)): only the sign check can see it.
    m = replace_param(make_manifest(), 0, 1, shape=(-1, -3))
    p = only_problem(m)
    assert p.message == "groups[0].params[1] ('encoder.bias') has a negative dimension in shape [-1, -3]"


@pytest.mark.parametrize(
    "path",
    ["../x", "/abs/shard.safetensors", "shards/../../x", "..", "s3://other/x", "shards\\x", "/"],
)
def test_problem_path_escapes_checkpoint(path):
    m = replace_shard(make_manifest(), 1, path=path)
    p = only_problem(m)
    assert p.message == f"file path {path!r} must be relative and stay inside the checkpoint"
    assert p.rank == 1


def test_problem_model_file_path_escapes():
    m = make_manifest(model_file=FileMeta("../model.safetensors", 10, CRC))
    p = only_problem(m)
    assert p.message == "file path '../model.safetensors' must be relative and stay inside the checkpoint"
    assert p.rank is None


def test_paths_inside_the_checkpoint_are_fine():
    for path in ("r0.safetensors", "shards/r0.safetensors", "deep/er/r0.safetensors"):
        assert check_manifest(replace_shard(make_manifest(), 0, path=path)) == []


@pytest.mark.parametrize("path", ["shards/./r0.safetensors", "a/../shards/r0.safetensors", "shards//r0"])
def test_non_canonical_paths_are_refused(path):
    # Paths must be canonical: one spelling per file keeps duplicate detection exact.
    p = only_problem(replace_shard(make_manifest(), 0, path=path))
    assert p.message == f"file path {path!r} must be relative and stay inside the checkpoint"


@pytest.mark.parametrize("path", ["", ".", "./", "shards/.."])
def test_problem_path_is_the_checkpoint_directory(path):
    p = only_problem(replace_shard(make_manifest(), 0, path=path))
    assert repr(path) in p.message


def test_file_name_starting_with_two_dots_is_inside():
    assert check_manifest(replace_shard(make_manifest(), 0, path="..r0.safetensors")) == []


def test_problem_duplicate_file_path():
    m = make_manifest()
    m = replace_shard(m, 1, path=m.shards[0].path)
    p = only_problem(m)
    assert p.message == "file 'shards/rank-00000-of-00002.safetensors' is listed twice"
    m = make_manifest(model_file=FileMeta(shard_path(0, 2), 10, CRC))
    assert only_problem(m).message == "file 'shards/rank-00000-of-00002.safetensors' is listed twice"


def test_problem_negative_bytes():
    p = only_problem(replace_shard(make_manifest(), 0, bytes=-1))
    assert p.message == "file 'shards/rank-00000-of-00002.safetensors' has negative size -1"
    assert p.rank == 0


@pytest.mark.parametrize(
    "checksum",
    ["md5:0a1b2c3d", "crc32c", "crc32c:", "crc32c:0a1b2c3", "crc32c:0a1b2c3d0", "", "sha256:" + "0" * 64, "CRC32C:0a1b2c3d"],
)
def test_problem_bad_checksum(checksum):
    p = only_problem(replace_shard(make_manifest(), 1, checksum=checksum))
    assert p.message.startswith("file 'shards/rank-00001-of-00002.safetensors': checksum")
    assert repr(checksum) in p.message
    assert p.rank == 1


def test_problem_bad_tensor_checksum():
    m = replace_shard(make_manifest(), 0, tensors={"g0.master": CRC, "g0.exp_avg": "crc32c:1234"})
    p = only_problem(m)
    assert "'crc32c:1234'" in p.message and "checksum" in p.message


def test_problem_bad_model_file_checksum():
    m = make_manifest(model_file=FileMeta(MODEL_FILE_NAME, 10, "adler:0"))
    assert "checksum 'adler:0'" in only_problem(m).message


def test_problem_non_hex_checksum_names_the_field():
    p = only_problem(replace_shard(make_manifest(), 1, checksum="crc32c:zzzzzzzz"))
    assert "checksum 'crc32c:zzzzzzzz'" in p.message


@pytest.mark.parametrize("stage", [3, -1, 4])
def test_problem_zero_stage(stage):
    p = only_problem(make_manifest(zero_stage=stage))
    assert p.message == f"zero_stage is {stage}; format v1 holds ZeRO stage 0, 1 or 2 checkpoints"


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_accepted(stage):
    assert check_manifest(make_manifest(zero_stage=stage)) == []


def test_problem_world_size_zero():
    m = make_manifest(world_size=1)
    m = dataclasses.replace(m, world_size=0, shards=())
    p = only_problem(m)
    assert p.message == "world_size is 0; it must be at least 1"


# ----- validation: many problems at once --------------------------------------------------------


def broken_manifest() -> Manifest:
    m = make_manifest(world_size=3, zero_stage=7)
    m = replace_group(m, 1, numel=99, partition_numel=33)  # numel wrong (pn consistent with 99)
    m = replace_param(m, 0, 1, dtype="complex32")
    m = replace_shard(m, 0, path="/etc/passwd")
    m = replace_shard(m, 2, checksum="crc32c:123")
    return m


EXPECTED_BROKEN = [
    "zero_stage is 7",
    "groups[0].params[1] ('encoder.bias') has unknown dtype 'complex32'",
    "groups[1].numel is 99 but its params add up to 6 elements",
    "file path '/etc/passwd' must be relative",
    "checksum 'crc32c:123'",
]


def test_all_problems_reported_in_order():
    problems = check_manifest(broken_manifest(), PATH)
    assert len(problems) == len(EXPECTED_BROKEN)
    for problem, expected in zip(problems, EXPECTED_BROKEN):
        assert expected in problem.message
        assert problem.path == PATH
        assert str(problem) == f"{PATH}: {problem.message}"
    assert [p.rank for p in problems] == [None, None, None, 0, 2]


def test_validate_raises_listing_every_problem():
    with pytest.raises(ManifestError) as info:
        broken_manifest().validate(PATH)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, CheckpointError)
    assert err.path == PATH
    message = str(err)
    assert message.startswith(f"5 problems: {PATH}: zero_stage is 7")
    for expected in EXPECTED_BROKEN:
        assert expected in message
    assert "\n" not in message


def test_validate_single_problem_message():
    with pytest.raises(ManifestError) as info:
        make_manifest(zero_stage=3).validate(PATH)
    assert str(info.value) == f"{PATH}: zero_stage is 3; format v1 holds ZeRO stage 0, 1 or 2 checkpoints"


def test_validate_caps_long_lists():
    m = make_manifest(world_size=12)
    m = dataclasses.replace(m, shards=tuple(dataclasses.replace(s, checksum="x") for s in m.shards))
    problems = check_manifest(m, PATH)
    assert len(problems) == 12
    with pytest.raises(ManifestError) as info:
        m.validate(PATH)
    message = str(info.value)
    assert message.startswith("12 problems: ")
    assert message.endswith(" (and 2 more)")
    assert message.count("checksum 'x'") == 10


def test_validate_default_path():
    with pytest.raises(ManifestError) as info:
        make_manifest(zero_stage=3).validate()
    assert info.value.path == "manifest.json"
    assert str(info.value).startswith("manifest.json: zero_stage is 3")


# ----- from_json errors -------------------------------------------------------------------------


def good_doc() -> dict:
    """The rich manifest as a JSON object, without its own checksum (tests edit it)."""
    doc = json.loads(rich_manifest().to_json())
    del doc["manifest_checksum"]
    return doc


def decode_error(text, path=PATH) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(text, path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == path
    assert str(err).startswith(f"{path}: ")
    assert "\n" not in str(err)
    return err


@pytest.mark.parametrize("text", ["", "{", "not json", b"\xff\xfe\x00garbage", "{'format': 'zero-ckpt'}"])
def test_from_json_not_json(text):
    err = decode_error(text)
    assert "not valid JSON" in str(err)
    assert "damaged" in str(err)


@pytest.mark.parametrize("text", ["[]", "1", '"zero-ckpt"', "null"])
def test_from_json_not_an_object(text):
    assert str(decode_error(text)) == f"{PATH}: expected a JSON object"


@pytest.mark.parametrize("fmt", ["zero_ckpt", "deepspeed", None, 1])
def test_from_json_wrong_format(fmt):
    doc = good_doc()
    doc["format"] = fmt
    err = decode_error(json.dumps(doc))
    assert f"format is {fmt!r}, not 'zero-ckpt'" in str(err)
    assert err.actual == fmt


def test_from_json_format_missing():
    doc = good_doc()
    del doc["format"]
    assert "format is None, not 'zero-ckpt'" in str(decode_error(json.dumps(doc)))


@pytest.mark.parametrize("version", [2, 0, 100, "1", None, 1.5])
def test_from_json_unknown_version(version):
    doc = good_doc()
    doc["version"] = version
    err = decode_error(json.dumps(doc))
    assert f"format version {version!r} is not supported" in str(err)
    newer = isinstance(version, int) and version > 1
    assert ("upgrade zero-ckpt" in str(err)) == newer
    assert ("damaged" in str(err)) == (not newer)
    assert err.expected == 1 and err.actual == version


@pytest.mark.parametrize(
    "where, mutate, field",
    [
        ("manifest", lambda d: d.__setitem__("compression", "zstd"), "compression"),
        ("groups[0]", lambda d: d["groups"][0].__setitem__("bucket_size", 5), "bucket_size"),
        ("groups[1].params", lambda d: d["groups"][1]["params"][0].__setitem__("requires_grad", True), "requires_grad"),
        ("shards", lambda d: d["shards"][2].__setitem__("etag", "abc"), "etag"),
        ("model_file", lambda d: d["model_file"].__setitem__("etag", "abc"), "etag"),
    ],
)
def test_from_json_unknown_field(where, mutate, field):
    doc = good_doc()
    mutate(doc)
    err = decode_error(json.dumps(doc))
    assert f"unknown field(s) [{field!r}] in {where}" in str(err)
    assert "upgrade zero-ckpt" in str(err)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("world_size"), "world_size"),
        (lambda d: d.pop("zero_stage"), "zero_stage"),
        (lambda d: d.pop("master_dtype"), "master_dtype"),
        (lambda d: d.pop("groups"), "groups"),
        (lambda d: d.pop("shards"), "shards"),
        (lambda d: d["groups"][0].pop("numel"), "numel"),
        (lambda d: d["groups"][0].pop("partition_numel"), "partition_numel"),
        (lambda d: d["groups"][0].pop("align"), "align"),
        (lambda d: d["groups"][0].pop("params"), "params"),
        (lambda d: d["groups"][0]["params"][1].pop("name"), "name"),
        (lambda d: d["groups"][0]["params"][1].pop("shape"), "shape"),
        (lambda d: d["groups"][0]["params"][1].pop("dtype"), "dtype"),
        (lambda d: d["groups"][0]["params"][1].pop("offset"), "offset"),
        (lambda d: d["shards"][0].pop("path"), "path"),
        (lambda d: d["shards"][0].pop("bytes"), "bytes"),
        (lambda d: d["shards"][0].pop("checksum"), "checksum"),
        (lambda d: d["model_file"].pop("checksum"), "checksum"),
    ],
)
def test_from_json_missing_field(mutate, field):
    doc = good_doc()
    mutate(doc)
    assert str(decode_error(json.dumps(doc))).startswith(f"{PATH}: required field {field!r} is missing (in ")


def test_from_json_optional_fields_may_be_absent():
    doc = json.loads(make_manifest().to_json())
    for key in ("created_by", "extra", "model_file", "manifest_checksum"):
        doc.pop(key)
    for g in doc["groups"]:
        for key in ("state_keys", "hyperparams", "scalars", "state_dtypes"):
            g.pop(key)
    m = Manifest.from_json(json.dumps(doc))
    assert m.created_by == "" and m.extra == {} and m.model_file is None
    assert m.groups[0].state_keys == () and m.groups[0].state_dtypes == {}
    assert check_manifest(m) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.__setitem__("world_size", "eight"),
        lambda d: d["groups"][0]["params"][0].__setitem__("shape", ["x", 4]),
        lambda d: d["groups"][0]["params"][0].__setitem__("shape", 7),
        lambda d: d["groups"][0].__setitem__("numel", None),
        lambda d: d.__setitem__("groups", [None]),
        lambda d: d.__setitem__("shards", [5]),
        lambda d: d.__setitem__("extra", [1, 2]),
        lambda d: d.__setitem__("groups", 3),
    ],
)
def test_from_json_malformed_field(mutate):
    doc = good_doc()
    mutate(doc)
    decode_error(json.dumps(doc))


@pytest.mark.parametrize(
    "mutate",
    [
        # 'list' object has no attribute 'items' (AttributeError escapes)
        pytest.param(lambda d: d["groups"][0].__setitem__("state_dtypes", ["exp_avg"]), id="state_dtypes-list"),
        pytest.param(lambda d: d["shards"][0].__setitem__("tensors", ["g0.master"]), id="tensors-list"),
        # 'list' object has no attribute 'get' (AttributeError escapes)
        pytest.param(lambda d: d.__setitem__("shards", [["path"]]), id="shard-as-list"),
        # OverflowError: cannot convert float infinity to integer
        pytest.param(lambda d: d.__setitem__("world_size", float("inf")), id="world_size-Infinity"),
        # silently truncated by int(): 3.7 -> 3, [2.9, 4] -> (2, 4)
        pytest.param(lambda d: d.__setitem__("world_size", 3.7), id="world_size-float"),
        pytest.param(lambda d: d["groups"][0]["params"][0].__setitem__("shape", [10.9, 4]), id="shape-float"),
        # JSON true == 1 in Python: accepted as version 1 and written back as "version": true
        pytest.param(lambda d: d.__setitem__("version", True), id="version-true"),
        # strings and objects are iterated: shape "104" -> (1, 0, 4), aliases "ab" -> ("a", "b"),
        # state_keys "exp" -> ("e", "x", "p"), groups {} -> no groups at all
        pytest.param(lambda d: d["groups"][0]["params"][0].__setitem__("shape", "104"), id="shape-string"),
        pytest.param(lambda d: d["groups"][0]["params"][0].__setitem__("aliases", "ab"), id="aliases-string"),
        pytest.param(lambda d: d["groups"][0].__setitem__("state_keys", "exp"), id="state_keys-string"),
        pytest.param(lambda d: d.__setitem__("groups", {}), id="groups-object"),
        # an empty object is falsy: model_file {} silently becomes "no model file"
        pytest.param(lambda d: d.__setitem__("model_file", {}), id="model_file-empty-object"),
    ],
)
def test_from_json_wrongly_typed_field_is_a_manifest_error(mutate):
    doc = good_doc()
    mutate(doc)
    with pytest.raises(ManifestError):
        Manifest.from_json(json.dumps(doc), PATH)


def test_from_json_default_path():
    with pytest.raises(ManifestError) as info:
        Manifest.from_json("{")
    assert info.value.path == "manifest.json"
    assert str(info.value).startswith("manifest.json: not valid JSON")


def test_from_json_does_not_validate():
    """Decoding is strict about the schema; consistency is check_manifest's job."""
    m = Manifest.from_json(make_manifest(zero_stage=9).to_json())
    assert m.zero_stage == 9
    assert len(check_manifest(m)) == 1
