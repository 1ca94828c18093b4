"""The storage layout in one place (issue 23): every kind of blob a writer makes is parsed back to its kind, tenant
and row by the retention sweep's parser, and no module outside shared/storage/keys.py builds a tenant key by hand
(the sweep deletes what it cannot attach to a row, so a drifted writer would lose live files)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.storage import keys

ROOT = Path(__file__).resolve().parents[1]
T, R = "ten_0123456789abcdef01234567", "id_0123456789abcdef0123456"


@pytest.mark.parametrize(
    ("key", "kind", "row"),
    [
        (keys.training_photo(T, "trn_1", 3, "jpg"), "training", "trn_1"),
        (keys.training_checkpoint(T, "trn_1"), "training", "trn_1"),
        (keys.adapter_file(T, "adp_1"), "adapter", "adp_1"),
        (keys.evaluation_photo(T, "adp_1", "evl_1", 0, "png"), "evaluation", "evl_1"),
        (keys.generation_image(T, "gen_1", 7), "generation", "gen_1"),
        (keys.class_image(T, "a" * 32, 12), "class_images", None),
        (f"tenants/{T}/notes.txt", "other", None),
    ],
)
def test_every_kind_of_blob_parses_back(key, kind, row):
    parsed = keys.parse(key)
    assert (parsed.kind, parsed.tenant_id, parsed.row_id) == (kind, T, row)
    assert key.startswith(keys.tenant_folder(T))


def test_folders_hold_their_blobs():
    assert keys.training_photo(T, "trn_1", 0, "png").startswith(keys.training_folder(T, "trn_1"))
    assert keys.training_checkpoint(T, "trn_1").startswith(keys.training_folder(T, "trn_1"))
    assert keys.evaluation_photo(T, "adp_1", "evl_1", 0, "png").startswith(keys.evaluation_folder(T, "adp_1", "evl_1"))
    assert keys.evaluation_folder(T, "adp_1", "evl_1").startswith(keys.adapter_folder(T, "adp_1"))
    assert not keys.adapter_file(T, "adp_1").startswith(keys.adapter_folder(T, "adp_1"))
    assert keys.generation_image(T, "gen_1", 0).startswith(keys.generation_folder(T, "gen_1"))


def test_no_other_module_builds_tenant_keys_by_hand():
    hand_made = re.compile(r"""f["']tenants/""")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("services", "workers", "shared")
        for path in (ROOT / folder).rglob("*.py")
        if path != ROOT / "shared/storage/keys.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if hand_made.search(line)
    ]
    assert not offenders, offenders
