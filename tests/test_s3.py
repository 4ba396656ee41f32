"""S3 through s3fs against moto on 127.0.0.1: round trips with local disk, multipart uploads,
aborts that leave nothing, bounded retries through a fault-injecting proxy, permanent errors
and corruption named by URL. (The storage contract suite also runs on S3: test_storage.py.)"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zero_ckpt  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from helpers_ckpt import build_groups, dir_bytes, expected_param, write_standard  # noqa: E402
from zero_ckpt.errors import (  # noqa: E402
    CheckpointError,
    CorruptShardError,
    MissingShardError,
    StorageError,
)
from zero_ckpt.storage import Location, _is_multipart_etag_of, open_location  # noqa: E402

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Same attempt count as production, millisecond backoff: fault tests stay fast.
    monkeypatch.setenv("ZERO_CKPT_RETRY_BASE_SECONDS", "0.002")
    monkeypatch.setenv("ZERO_CKPT_RETRY_MAX_SECONDS", "0.02")
    monkeypatch.setenv("ZERO_CKPT_FSYNC", "0")


def _files(url: str, options: dict) -> dict[str, bytes]:
    """Every object under ``url`` (read directly, not through a proxy)."""
    with open_location(url, options) as loc:
        return {rel: loc.read_bytes(rel) for rel in loc.list_files()}


def _same(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    """Same files, same bytes; manifests compared as documents (reshard rewrites them)."""
    doc = lambda files: {k: json.loads(v) if k == "manifest.json" else v for k, v in files.items()}  # noqa: E731
    return doc(a) == doc(b)


def _pending_uploads(loc: Location) -> list[str]:
    """Keys with a multipart upload in progress in the location's bucket (the server's view)."""
    res = loc.fs.call_s3("list_multipart_uploads", Bucket=loc._s3.bucket)
    return [u["Key"] for u in res.get("Uploads", [])]


def _etag(loc: Location, rel: str) -> str:
    return loc.fs.call_s3("head_object", Bucket=loc._s3.bucket, Key=loc._s3.key(rel))["ETag"].strip('"')


# ----- options, credentials, endpoints -------------------------------------------------------------


def test_storage_options_flow_to_s3fs_unchanged(s3_bucket) -> None:
    bucket, options = s3_bucket
    given = {**options, "anon": True, "client_kwargs": {"region_name": "eu-west-1"}}
    loc = Location(f"{bucket}/x", given)
    assert loc.fs.endpoint_url == options["endpoint_url"]
    assert loc.fs.anon is True
    assert loc.fs.client_kwargs == {"region_name": "eu-west-1"}
    assert given == {**options, "anon": True, "client_kwargs": {"region_name": "eu-west-1"}}  # untouched
    # botocore tries once: retries are counted in storage only.
    assert loc.fs.config_kwargs["retries"] == {"total_max_attempts": 1}
    # Same options share one client; a user's own s3fs instance is not ours.
    assert Location(f"{bucket}/y", dict(given)).fs is loc.fs
    assert Location(f"{bucket}/x", options).fs is not loc.fs
    import fsspec

    theirs = fsspec.filesystem("s3", **given)
    assert theirs is not loc.fs and "retries" not in theirs.config_kwargs


def test_endpoint_and_credentials_from_an_aws_profile(s3_server, s3_bucket, tmp_path: Path, monkeypatch) -> None:
    bucket, _ = s3_bucket
    (tmp_path / "config").write_text(
        f"[profile zc]\nregion = us-east-1\nendpoint_url = {s3_server.endpoint}\n"
    )
    (tmp_path / "credentials").write_text("[zc]\naws_access_key_id = k\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    with open_location(f"{bucket}/p", {"profile": "zc"}) as loc:
        loc.write_atomic("a.bin", b"abc")
        assert loc.read_bytes("a.bin") == b"abc"


# ----- round trips -------------------------------------------------------------------------------


def test_round_trips_between_s3_and_local_are_bit_identical(s3_bucket, tmp_path: Path) -> None:
    bucket, opts = s3_bucket
    manifest, inputs = write_standard(tmp_path / "ref", 4)
    write_standard(f"{bucket}/a", 4, storage_options=opts)
    ref = dir_bytes(tmp_path / "ref")
    assert _files(f"{bucket}/a", opts) == ref
    assert zero_ckpt.verify(f"{bucket}/a", storage_options=opts).ok

    zero_ckpt.reshard(f"{bucket}/a", str(tmp_path / "l3"), world_size=3, storage_options=opts)  # s3 -> local
    zero_ckpt.reshard(str(tmp_path / "l3"), f"{bucket}/b", world_size=4, dst_storage_options=opts)  # local -> s3
    assert _same(_files(f"{bucket}/b", opts), ref)
    zero_ckpt.reshard(f"{bucket}/b", f"{bucket}/c3", world_size=3, storage_options=opts)  # s3 -> s3
    assert _files(f"{bucket}/c3", opts) == dir_bytes(tmp_path / "l3")

    zero_ckpt.consolidate(f"{bucket}/c3", str(tmp_path / "cons"), include_optimizer=True, storage_options=opts)
    zero_ckpt.consolidate(str(tmp_path / "ref"), str(tmp_path / "cons-ref"), include_optimizer=True)
    assert dir_bytes(tmp_path / "cons") == dir_bytes(tmp_path / "cons-ref")
    with zero_ckpt.open_checkpoint(f"{bucket}/c3", storage_options=opts) as reader:
        assert torch.equal(reader.read("head.w"), expected_param(inputs, "head.w"))


# ----- reads ---------------------------------------------------------------------------------------


def test_read_into_is_one_ranged_get(s3_server, s3_bucket) -> None:
    bucket, opts = s3_bucket
    data = bytes(range(256)) * 8
    with open_location(f"{bucket}/r", opts) as loc:
        loc.write_atomic("f.bin", data)
    with FaultProxy(s3_server.endpoint) as proxy, open_location(f"{bucket}/r", proxy.storage_options) as loc:
        buf = bytearray(100)
        loc.read_into("f.bin", 300, memoryview(buf))
        assert bytes(buf) == data[300:400]
        assert [(m, r) for m, _, _, r, _ in proxy.log] == [("GET", "bytes=300-399")]


# ----- multipart uploads -----------------------------------------------------------------------------


def test_multipart_write_at_from_threads_in_any_order(s3_bucket) -> None:
    bucket, opts = s3_bucket
    size = 3 * 5 * MiB + 12345  # 4 parts of 5 MiB, the last one short
    data = random.Random(1).randbytes(size)
    piece = 700_001  # pieces straddle part boundaries
    offsets = list(range(0, size, piece))
    random.Random(2).shuffle(offsets)
    with open_location(f"{bucket}/m", opts) as loc:
        w = loc.writer("big.bin", size, part_bytes=5 * MiB)
        assert w.supports_write_at

        def work(mine: list[int]) -> None:
            for off in mine:
                w.write_at(off, memoryview(data)[off : off + piece])

        threads = [threading.Thread(target=work, args=(offsets[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not loc.exists("big.bin")  # parts are up, the object is not
        w.commit()
        assert loc.read_bytes("big.bin") == data
        assert _etag(loc, "big.bin").endswith("-4")  # really four parts
        assert _pending_uploads(loc) == []
        # What a commit whose answer was lost checks (the retry finds the upload gone):
        parts = [w._upload._etags[p] for p in range(4)]
        assert _is_multipart_etag_of(_etag(loc, "big.bin"), parts)
        assert not _is_multipart_etag_of(_etag(loc, "big.bin"), parts[::-1])
        assert not _is_multipart_etag_of(_etag(loc, "big.bin"), parts[:3])


def test_sequential_writes_of_unknown_size_use_parts(s3_bucket, monkeypatch) -> None:
    bucket, opts = s3_bucket
    monkeypatch.setenv("ZERO_CKPT_S3_UPLOADS", "1")  # each part waits for the previous upload
    data = random.Random(3).randbytes(2 * 5 * MiB + 7)
    with open_location(f"{bucket}/u", opts) as loc:
        with loc.writer("s.bin", part_bytes=5 * MiB) as w:
            for i in range(0, len(data), 3 * MiB):
                w.write(data[i : i + 3 * MiB])
        assert loc.read_bytes("s.bin") == data
        assert _etag(loc, "s.bin").endswith("-3")
        assert _pending_uploads(loc) == []


def test_abort_leaves_no_object_and_no_pending_upload(s3_bucket) -> None:
    bucket, opts = s3_bucket
    with open_location(f"{bucket}/ab", opts) as loc:
        w = loc.writer("big.bin", 12 * MiB, part_bytes=5 * MiB)
        w.write(b"\1" * (11 * MiB))  # two parts complete and uploading
        small = loc.writer("small.bin", 10)
        small.write(b"x" * 10)
        w._upload._wait_uploads()
        assert _pending_uploads(loc) == [loc._s3.key("big.bin")]
        w.abort()
        small.abort()
        assert _pending_uploads(loc) == []
        assert loc.list_files() == []


def test_a_failed_part_upload_fails_commit_and_cleans_up(s3_server, s3_bucket) -> None:
    bucket, _ = s3_bucket
    part_put = lambda method, path, query: method == "PUT" and "partNumber=" in query  # noqa: E731
    with FaultProxy(s3_server.endpoint, fail_rate=1.0, faults=("403",), match=part_put) as proxy:
        with open_location(f"{bucket}/pf", proxy.storage_options) as loc:
            w = loc.writer("big.bin", 11 * MiB, part_bytes=5 * MiB)
            with pytest.raises(StorageError, match="permission denied") as info:
                w.write(b"\2" * (11 * MiB))
                w.commit()
            assert loc.url_of("big.bin") in str(info.value)
            w.abort()
            assert _pending_uploads(loc) == [] and loc.list_files() == []


@pytest.mark.parametrize("lost", ["create", "complete"])
def test_lost_answers_to_create_and_complete(s3_server, s3_bucket, lost: str) -> None:
    """The server acted but the answer was cut off: the retry must neither fail the commit
    nor leave an orphaned upload."""
    bucket, _ = s3_bucket
    if lost == "create":
        match = lambda method, path, query: method == "POST" and query.startswith("uploads")  # noqa: E731
    else:
        match = lambda method, path, query: method == "POST" and "uploadId=" in query  # noqa: E731
    data = random.Random(4).randbytes(6 * MiB)
    # Every matching request would fail, but each one at most once: the retry gets through.
    with FaultProxy(s3_server.endpoint, fail_every=1, faults=("drop",), match=match,
                    max_failures_per_request=1) as proxy:
        with open_location(f"{bucket}/lost", proxy.storage_options) as loc:
            with loc.writer("f.bin", len(data), part_bytes=5 * MiB) as w:
                w.write(data)
            assert proxy.failed["drop"] == 1
            assert loc.read_bytes("f.bin") == data
            assert _pending_uploads(loc) == []


# ----- faults ----------------------------------------------------------------------------------------


def test_jobs_finish_bit_identical_with_a_quarter_of_requests_failing(s3_server, s3_bucket, tmp_path: Path) -> None:
    bucket, direct = s3_bucket
    _, inputs = write_standard(tmp_path / "ref", 4)
    zero_ckpt.reshard(str(tmp_path / "ref"), str(tmp_path / "ref3"), world_size=3)
    with FaultProxy(s3_server.endpoint, fail_rate=0.25, seed=7) as proxy:
        opts = proxy.storage_options
        write_standard(f"{bucket}/a", 4, storage_options=opts)
        assert zero_ckpt.verify(f"{bucket}/a", storage_options=opts).ok
        zero_ckpt.reshard(f"{bucket}/a", f"{bucket}/b", world_size=3, storage_options=opts)
        zero_ckpt.consolidate(f"{bucket}/b", str(tmp_path / "cons"), storage_options=opts)
        zero_ckpt.reshard(str(tmp_path / "ref3"), f"{bucket}/c", world_size=4, dst_storage_options=opts)
        with zero_ckpt.open_checkpoint(f"{bucket}/c", storage_options=opts) as reader:
            assert torch.equal(reader.read("enc.w", "exp_avg"), expected_param(inputs, "enc.w", "exp_avg"))
    ref = dir_bytes(tmp_path / "ref")
    assert _files(f"{bucket}/a", direct) == ref
    assert _files(f"{bucket}/b", direct) == dir_bytes(tmp_path / "ref3")
    assert _same(_files(f"{bucket}/c", direct), ref)
    zero_ckpt.consolidate(str(tmp_path / "ref"), str(tmp_path / "cons-ref"))
    assert dir_bytes(tmp_path / "cons") == dir_bytes(tmp_path / "cons-ref")
    assert all(proxy.failed[f] > 0 for f in ("500", "503", "reset", "drop")), proxy.failed
    assert proxy.total_failed >= proxy.requests // 8
    with open_location(bucket, direct) as loc:
        assert _pending_uploads(loc) == []


def test_multipart_jobs_with_parallel_segments_survive_faults(s3_server, s3_bucket, monkeypatch) -> None:
    """Several workers fill one multipart object (segments smaller than parts, so parts
    straddle segments) while a fifth of the requests fail."""
    from zero_ckpt import transfer

    bucket, direct = s3_bucket
    monkeypatch.setattr(transfer, "_SEGMENT_BYTES", 1 * MiB)
    monkeypatch.setenv("ZERO_CKPT_S3_PART_BYTES", str(5 * MiB))
    with FaultProxy(s3_server.endpoint, fail_rate=0.2, seed=3) as proxy:
        opts = proxy.storage_options
        groups = build_groups([[("w", (1_000_003,))]], seed=5)
        zero_ckpt.write_checkpoint(f"{bucket}/a", groups, world_size=2, storage_options=opts)
        zero_ckpt.reshard(f"{bucket}/a", f"{bucket}/one", world_size=1, storage_options=opts, workers=4)
        zero_ckpt.reshard(f"{bucket}/one", f"{bucket}/back", world_size=2, storage_options=opts, workers=4)
    assert proxy.total_failed > 0
    assert _same(_files(f"{bucket}/back", direct), _files(f"{bucket}/a", direct))
    with open_location(f"{bucket}/one", direct) as loc:
        assert _etag(loc, "shards/rank-00000-of-00001.safetensors").endswith("-3")
        assert _pending_uploads(loc) == []


def test_every_request_failing_stops_with_a_clear_error(s3_server, s3_bucket) -> None:
    bucket, direct = s3_bucket
    write_standard(f"{bucket}/good", 2, storage_options=direct)
    with FaultProxy(s3_server.endpoint, fail_rate=1.0) as proxy:
        opts = proxy.storage_options
        with pytest.raises(StorageError) as info:
            write_standard(f"{bucket}/new", 2, storage_options=opts)
        assert f"{bucket}/new" in str(info.value) and "still failing after 5 attempts" in str(info.value)

        with pytest.raises(StorageError) as info:
            zero_ckpt.reshard(f"{bucket}/good", f"{bucket}/out", world_size=3,
                              storage_options=direct, dst_storage_options=opts)
        assert f"{bucket}/out" in str(info.value)

        with pytest.raises(StorageError) as info:
            zero_ckpt.open_checkpoint(f"{bucket}/good", storage_options=opts)
        assert f"{bucket}/good/manifest.json" in str(info.value)

        report = zero_ckpt.verify(f"{bucket}/good", storage_options=opts)
        assert not report.ok and f"{bucket}/good/manifest.json" in str(report.problems[0])
    for name in ("new", "out"):
        assert "manifest.json" not in _files(f"{bucket}/{name}", direct)


def test_a_destination_failing_midway_leaves_no_manifest(s3_server, s3_bucket) -> None:
    bucket, direct = s3_bucket
    write_standard(f"{bucket}/good", 4, storage_options=direct)
    with FaultProxy(s3_server.endpoint) as proxy:

        def progress(done: int, total: int) -> None:
            if done:  # the job has started moving bytes: from now on nothing gets through
                proxy.configure(fail_rate=1.0)

        with pytest.raises(CheckpointError) as info:
            zero_ckpt.reshard(f"{bucket}/good", f"{bucket}/out", world_size=3, progress=progress,
                              storage_options=direct, dst_storage_options=proxy.storage_options,
                              workers=1)
    assert f"{bucket}/out/" in str(info.value) and "still failing" in str(info.value)
    assert "manifest.json" not in _files(f"{bucket}/out", direct)


def test_retries_are_bounded_and_permanent_errors_are_not_retried(s3_server, s3_bucket, monkeypatch) -> None:
    bucket, direct = s3_bucket
    with open_location(f"{bucket}/r", direct) as loc:
        loc.write_atomic("f.bin", b"abc")
    monkeypatch.setenv("ZERO_CKPT_RETRIES", "3")
    with FaultProxy(s3_server.endpoint, fail_rate=1.0, faults=("503",)) as proxy:
        with open_location(f"{bucket}/r", proxy.storage_options) as loc, pytest.raises(StorageError) as info:
            loc.size("f.bin")
        assert proxy.requests == 3  # ours only: neither botocore nor s3fs add attempts
        assert str(info.value).startswith(f"cannot stat {bucket}/r/f.bin: HTTP 503")
    with FaultProxy(s3_server.endpoint, fail_rate=1.0, faults=("403",)) as proxy:
        with open_location(f"{bucket}/r", proxy.storage_options) as loc, pytest.raises(StorageError) as info:
            loc.read_bytes("f.bin")
        assert proxy.requests == 1
        assert str(info.value) == (
            f"cannot read {bucket}/r/f.bin: permission denied (AccessDenied: check the credentials "
            "and the bucket policy)"
        )


def test_missing_objects_buckets_and_bad_bucket_names(s3_bucket) -> None:
    bucket, opts = s3_bucket
    with open_location(f"{bucket}/x", opts) as loc:
        with pytest.raises(MissingShardError, match=f"^{bucket}/x/nope.bin is missing$"):
            loc.read_range("nope.bin", 0, 8)
    with pytest.raises(StorageError, match="bucket 'zc-no-such-bucket' does not exist"):
        zero_ckpt.open_checkpoint("s3://zc-no-such-bucket/ckpt", storage_options=opts)
    with pytest.raises(StorageError, match="not a valid S3 bucket name"):
        Location("s3://bad bucket!/x", opts)


# ----- corruption ------------------------------------------------------------------------------------


def test_corrupted_or_missing_shard_on_s3_is_named(s3_bucket) -> None:
    bucket, opts = s3_bucket
    write_standard(f"{bucket}/c", 2, storage_options=opts)
    shard = "shards/rank-00001-of-00002.safetensors"
    with open_location(f"{bucket}/c", opts) as loc:
        data = bytearray(loc.read_bytes(shard))
        data[-3] ^= 0xFF  # a flipped byte in the data section, same size
        loc.write_atomic(shard, bytes(data))
        url = loc.url_of(shard)
    report = zero_ckpt.verify(f"{bucket}/c", storage_options=opts)
    assert [(p.path, p.kind) for p in report.problems] == [(url, "checksum")]
    with pytest.raises(CorruptShardError, match="checksum mismatch") as info:
        zero_ckpt.reshard(f"{bucket}/c", f"{bucket}/c3", world_size=3, storage_options=opts)
    assert url in str(info.value)
    assert "manifest.json" not in _files(f"{bucket}/c3", opts)

    with open_location(f"{bucket}/c", opts) as loc:
        loc.remove(shard)
    report = zero_ckpt.verify(f"{bucket}/c", storage_options=opts)
    assert [(p.path, p.kind) for p in report.problems] == [(url, "missing")]
    with pytest.raises(MissingShardError, match=url):
        zero_ckpt.reshard(f"{bucket}/c", f"{bucket}/c3b", world_size=3, storage_options=opts)
