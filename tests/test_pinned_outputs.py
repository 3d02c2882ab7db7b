"""mix and pack write exactly the bytes they wrote before they were made to scale (batched tokenization, tokens in
Arrow/numpy form, a best-fit structure): a fixed synthetic corpus, with dirty rows, through fetch, mix and pack under
three sets of params covers truncate, split and drop, bfd and stacked, examples and tokens weighting.

The digests were recorded from the code before that change (issue-9's mix and pack, which write Parquet with page
checksums). A change of what the stages write must change them on
purpose. Parquet files also record the pyarrow version that wrote them: with another pyarrow their bytes are not
compared, but the content digest (every column's values, the schema and its metadata) still is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow
import pyarrow.parquet as pq
import pytest

from bench.corpus import SOURCES, write_sources
from friction import packing, schemas
from friction.config import Params
from stages import fetch, mix, pack

RECORDED_WITH_PYARROW = "26.0.1"
ROW_GROUP_TOKENS = schemas.ROW_GROUP_TOKENS  # the stages' own, more than any of these corpora
VARIANTS = {
    "bfd-truncate-examples": {"model": {"max_length": 1024}, "pack": {"strategy": "bfd", "overflow": "truncate"}},
    "stacked-split-tokens": {
        "model": {"max_length": 512},
        "pack": {"strategy": "stacked", "overflow": "split"},
        "mix": {"weighting": "tokens", "target_max": 150},
    },
    "bfd-drop-examples": {"model": {"max_length": 1200}, "pack": {"strategy": "bfd", "overflow": "drop"}},
}
OUTPUTS = [
    "data/mixed/train.parquet",
    "data/mixed/validation.parquet",
    "data/mixed/dropped.jsonl",
    "metrics/mix.json",
    "data/packed/train.parquet",
    "data/packed/validation.parquet",
    "metrics/pack.json",
]
EXPECTED: dict[str, dict[str, str]] = {
    "bfd-drop-examples": {
        "data/mixed/train.parquet": "cb1296137dc300dd65fd91b6e6d341672ecaf3db24cde07a99650cbca46a86a1",
        "data/mixed/train.parquet content": "55ebd4f2422a1c550b0054a6be7248e933f1f3d74542c218d69e48367638810a",
        "data/mixed/validation.parquet": "d5cc85886e8194364c6bd8e7a08425e3ffa3289d2c539012ccef0d285370101d",
        "data/mixed/validation.parquet content": "6a4fbbf19c99057b2ded92850b1e9fb332e08448d6f42f44bccaae939039477b",
        "data/mixed/dropped.jsonl": "2ff129397c6e3c44f8f705e0a8df7afdd5370d2dc550322585442830cde49b29",
        "data/mixed/dropped.jsonl content": "2ff129397c6e3c44f8f705e0a8df7afdd5370d2dc550322585442830cde49b29",
        "metrics/mix.json": "61d0bcf866051aa198f3ea5055d91783f0457a752052762384088126b9baa9f2",
        "metrics/mix.json content": "61d0bcf866051aa198f3ea5055d91783f0457a752052762384088126b9baa9f2",
        "data/packed/train.parquet": "7bd14545ba250ef32a2fc848836167bb60057848b994f267882683d2a8adca43",
        "data/packed/train.parquet content": "a984e684f4c518f4449c5cb1eb5ed0e92e8a858ab3107c485d6c6bbe8985e6ea",
        "data/packed/validation.parquet": "2b436b57fd6876891b5efe2e9d473008a2ef4f9851d694c1d5444f3d884c234c",
        "data/packed/validation.parquet content": "97d0065830b47d7dfbc5c0e4d797f0a2a93d5b804c35703185ccab5f08e0acc9",
        "metrics/pack.json": "327e6d17d2043fa00854b74aa1ddede98a75914c4720b41104e6b063a9a81876",
        "metrics/pack.json content": "327e6d17d2043fa00854b74aa1ddede98a75914c4720b41104e6b063a9a81876",
    },
    "bfd-truncate-examples": {
        "data/mixed/train.parquet": "26cd8e849cc5b9aaa1dcf37c2d93442261551c440eae6ceba847de892c706af9",
        "data/mixed/train.parquet content": "48a2b9b75fccf531c3ed46081263bd4793277a73186f8e3e9be3fc92ca0f458f",
        "data/mixed/validation.parquet": "7c01685f76fcdf7959c0cf974aedc3e6a80a246d32d3c6988d1d88bb218410ba",
        "data/mixed/validation.parquet content": "c9cffee6fc533af8da5cd550b37bc25c6bcd9c4647e000699ffc1ef65d5038d8",
        "data/mixed/dropped.jsonl": "81dd25639b2b41bac9ef9541917561450b4fbc8f512046c748f82eea21aeea20",
        "data/mixed/dropped.jsonl content": "81dd25639b2b41bac9ef9541917561450b4fbc8f512046c748f82eea21aeea20",
        "metrics/mix.json": "5f7bb080a26bb7a3bf25aaf84b67acb6c58fc019dea6e1e662274c534d955cb7",
        "metrics/mix.json content": "5f7bb080a26bb7a3bf25aaf84b67acb6c58fc019dea6e1e662274c534d955cb7",
        "data/packed/train.parquet": "e373f6e7ea63f9772d72c7a3e91a054dc6a6f53d49c234ce08762c7d4686b1ce",
        "data/packed/train.parquet content": "7c752d1e3add73db8980e7e07102c23ea390c4ace1820648d3be20942e405f42",
        "data/packed/validation.parquet": "6c9ea06945e9320942ca5eb1633389214b15acb74b0ed9b6f6a0aa60e5128cb9",
        "data/packed/validation.parquet content": "05a37466d0a2f32cc99191412545f2c462c6faccf830c7c313e2dbe5a368d537",
        "metrics/pack.json": "11bcd44deea8ac44eb2bbd774ccda771fdcc0a8a4b7837ae757f3184029d059f",
        "metrics/pack.json content": "11bcd44deea8ac44eb2bbd774ccda771fdcc0a8a4b7837ae757f3184029d059f",
    },
    "stacked-split-tokens": {
        "data/mixed/train.parquet": "db5b244a7aa94a02605186b2e1ff21332109451226929d1bfcdc6cd472bb37c2",
        "data/mixed/train.parquet content": "94adb8bce573f8e66a95b5cffa5758c617a97a7fbd9f0957c75981a661b9ab58",
        "data/mixed/validation.parquet": "d0a10ab7095a65366693a9028bbee173b95fba6632f699c2af6e5726765482c2",
        "data/mixed/validation.parquet content": "8303e31e6bd27bde4f313456601693acf0ce45c09c2c30dfd081a53bc70b34e2",
        "data/mixed/dropped.jsonl": "81dd25639b2b41bac9ef9541917561450b4fbc8f512046c748f82eea21aeea20",
        "data/mixed/dropped.jsonl content": "81dd25639b2b41bac9ef9541917561450b4fbc8f512046c748f82eea21aeea20",
        "metrics/mix.json": "6089f8ac80848e88f8ae24cc9f61eb2586f3049d10d307d8d6e83d0c8c1796df",
        "metrics/mix.json content": "6089f8ac80848e88f8ae24cc9f61eb2586f3049d10d307d8d6e83d0c8c1796df",
        "data/packed/train.parquet": "f82f585f6b70e421b8582ec770355d51121a8efd808a5be38be76f77b1b59cfb",
        "data/packed/train.parquet content": "56c4735610205b006971be9a4ec98b1941575cafe698ed458801cdbe73702ee4",
        "data/packed/validation.parquet": "8c91eaf15d1a29ef4097d43347d9552fbc2a2d8d41f39795c4f8268a03f95717",
        "data/packed/validation.parquet content": "9361bf1af99655201744674a1d5eb5297f5dd7816b14e7f8d73c6fbb246cd0c8",
        "metrics/pack.json": "6774ef2d43f0e2d4937cc1e7560a24cccb48b286a89163c88a1cdab03a755bde",
        "metrics/pack.json content": "6774ef2d43f0e2d4937cc1e7560a24cccb48b286a89163c88a1cdab03a755bde",
    },
}


def content_digest(path: Path) -> str:
    """What a file holds, independent of the writer's version: a Parquet file's schema, metadata and values."""
    if path.suffix != ".parquet":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    table = pq.read_table(path)
    digest = hashlib.sha256(str(table.schema).encode())
    digest.update(
        json.dumps(
            {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"ARROW:schema"},
            sort_keys=True,
        ).encode()
    )
    for name in table.column_names:
        digest.update(json.dumps(table.column(name).to_pylist()).encode())
    return digest.hexdigest()


def run_stages(workspace: Path, params: Params) -> dict[str, str]:
    fetch.run(params, Path("data/raw"))
    mix.run(params, Path("data/raw"), Path("data/raw/manifest.json"), Path("data/mixed"), Path("metrics/mix.json"))
    pack.run(params, Path("data/mixed"), Path("data/packed"), Path("metrics/pack.json"))
    digests = {}
    for name in OUTPUTS:
        path = workspace / name
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        digests[f"{name} content"] = content_digest(path)
    return digests


@pytest.mark.parametrize(
    ("variant", "chunk_tokens", "row_group_tokens"),
    [(name, packing.CHUNK_TOKENS, ROW_GROUP_TOKENS) for name in sorted(VARIANTS)]
    + [
        ("stacked-split-tokens", 37, ROW_GROUP_TOKENS),
        ("bfd-truncate-examples", packing.CHUNK_TOKENS, 3000),
        ("stacked-split-tokens", 37, 700),
    ],
)
def test_mix_and_pack_write_the_recorded_bytes(
    variant: str,
    chunk_tokens: int,
    row_group_tokens: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_model_dir: Path,
    demo_params: Params,
) -> None:
    """Rows laid out a few at a time give the same bytes. Files written in many row groups (a corpus over
    ROW_GROUP_TOKENS) hold the same content, and pack reads them back whole."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(packing, "CHUNK_TOKENS", chunk_tokens)
    monkeypatch.setattr(schemas, "ROW_GROUP_TOKENS", row_group_tokens)
    write_sources(tmp_path / "data/sources/synthetic", 240, seed=7, dirty=True)
    (tmp_path / "data/sources/demo-base").symlink_to(tiny_model_dir)
    raw = demo_params.model_dump()
    raw["data"]["sources"] = {
        name: {"path": f"data/sources/synthetic/{name}.jsonl", "format": source_format}
        for name, source_format in SOURCES.items()
    }
    for section, values in VARIANTS[variant].items():
        raw[section].update(values)
    digests = run_stages(tmp_path, Params.model_validate(raw))
    expected = EXPECTED[variant]
    one_group = row_group_tokens == ROW_GROUP_TOKENS
    compared = {
        name: value
        for name, value in digests.items()
        if name.endswith("content")
        or (pyarrow.__version__ == RECORDED_WITH_PYARROW and (one_group or not name.endswith(".parquet")))
    }
    assert compared == {name: expected[name] for name in compared}
    groups = [pq.ParquetFile(path).num_row_groups for path in sorted(tmp_path.glob("data/*/*.parquet"))]
    assert all(count > 1 for count in groups) if not one_group else groups == [1] * 4, groups
