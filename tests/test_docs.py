"""The README's configuration table names every setting the code reads."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_readme():
    from shared.settings import Settings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [f"KRONA_{name.upper()}" for name in Settings.model_fields if f"KRONA_{name.upper()}" not in readme]
    assert not missing, f"settings missing from README.md: {missing}"
