"""The plugin author's guide (docs/plugins.md) and the README's plugin section work as written:
every code block is written to a file and run (plugins loaded and asked, the guide's own tests
run by pytest against the kit, config and pyproject checked); CI runs the README's command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bot import plugin_options
from bot.testing import make_app

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "plugins.md"
README = REPO / "README.md"
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```\s*$", re.S | re.M)


def code_blocks(text: str) -> list[tuple[str, str]]:
    return [(language, body) for language, body in FENCE.findall(text)]


def guide_files() -> dict[str, str]:
    """The guide's code blocks by the file name on their first line (``# shout.py``)."""
    files: dict[str, str] = {}
    for language, body in code_blocks(GUIDE.read_text(encoding="utf-8")):
        first = body.splitlines()[0]
        assert language in ("python", "toml"), f"a {language or 'plain'} block cannot be run: {first}"
        match = re.fullmatch(r"# ([\w.-]+\.(py|toml))", first)
        assert match, f"a block must start with '# <file name>': {first!r}"
        assert match.group(1) not in files, f"two blocks write {match.group(1)}"
        files[match.group(1)] = body
    return files


def readme_plugin_section() -> str:
    """The short plugin guide (docs/writing-a-plugin.md, once the README's section)."""
    return (REPO / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")


@pytest.fixture
def guide_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "guide"
    folder.mkdir()
    for name, body in guide_files().items():
        (folder / name).write_text(body, encoding="utf-8")
    readme_python = [body for language, body in code_blocks(readme_plugin_section()) if language == "python"]
    assert len(readme_python) == 1
    (folder / "readme_guess.py").write_text(readme_python[0], encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    return folder


def plugin_modules(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("test_"))


def guide_options(folder: Path) -> dict:
    return tomllib.loads((folder / "config.toml").read_text(encoding="utf-8"))["plugins"]["options"]


def test_the_guide_has_a_block_for_every_part() -> None:
    files = guide_files()
    assert {"shout.py", "wordlengths.py", "embednorm.py", "test_embednorm.py", "config.toml", "pyproject.toml"} <= set(
        files
    )
    section = readme_plugin_section()
    assert "(plugins.md)" in section and "examples/lmbot-example" in section
    assert "(docs/writing-a-plugin.md)" in README.read_text(encoding="utf-8")
    for heading in ("Commands and options", "Replies and charts", "Worker tasks", "Plugin options", "Testing"):
        assert f"## {heading}" in GUIDE.read_text(encoding="utf-8")


async def test_the_guides_plugins_load_and_answer(guide_dir: Path, cache_dir: Path, tiny_gpt2: Path) -> None:
    modules, options = plugin_modules(guide_dir), guide_options(guide_dir)
    app = make_app(*modules, "plugins.study", cache_dir=cache_dir, models={"causal_lm": tiny_gpt2}, options=options)
    try:
        failed = {r.name: r.error for r in app.plugin_records if r.status != "loaded"}
        assert failed == {}
        assert plugin_options(app.context(), "embednorm") == {"rows": 5}
        assert (await app.ask("/shout text:hello times:2")).text == "HELLO HELLO"
        norms = await app.ask("/embednorm text:The cat sat on the mat and looked around")
        assert not norms.error, norms.text
        assert len(norms.table.rows) == 5 and len(norms.data["norms"]) == len(norms.data["tokens"]) > 5
        guessed = await app.ask("/guess prompt:The capital of France is")  # the README's plugin
        assert not guessed.error and guessed.text.startswith("The capital of France is")
        assert 0 < guessed.data["prob"] <= 1
        card = await app.ask("/topic name:embeddings")
        assert card.title == "Token embeddings"
    finally:
        await app.close()


def test_the_guides_pyproject_packages_its_plugins(guide_dir: Path) -> None:
    project = tomllib.loads((guide_dir / "pyproject.toml").read_text(encoding="utf-8"))
    entry_points = project["project"]["entry-points"]["lmbot"]
    modules = {
        p.stem for p in guide_dir.glob("*.py") if p.stem not in ("readme_guess",) and not p.stem.startswith("test_")
    }
    assert set(entry_points.values()) == modules
    assert set(project["tool"]["setuptools"]["py-modules"]) == modules
    assert all(name == module for name, module in entry_points.items())  # [plugins.options.<name>] = module


def test_the_guides_tests_pass_with_the_kit(guide_dir: Path, tmp_path: Path) -> None:
    """The guide's test file, run by pytest in the guide's own project folder (its pyproject)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(guide_dir), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "bot.testing.pytest_plugin",
            "--basetemp",
            str(tmp_path / "inner"),
            "test_embednorm.py",
        ],
        cwd=guide_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = README.read_text(encoding="utf-8")
    section = readme.split("run the whole test suite (this is what CI runs):", 1)[1]
    command = code_blocks(section)[0][1].strip()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci == command
    assert command.endswith(".venv/bin/python -m pytest examples/lmbot-example")
    install = (REPO / "scripts" / "install.sh").read_text(encoding="utf-8")
    assert re.search(
        r'if \[ "\$\{1:-\}" = "--test" \]; then\n(.*\n)*?\s+\$PIP install --quiet ./examples/lmbot-example', install
    )


def test_the_kit_is_a_pytest_plugin_and_the_example_an_lmbot_plugin() -> None:
    ours = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert ours["project"]["entry-points"]["pytest11"] == {"bot.testing.pytest_plugin": "bot.testing.pytest_plugin"}
    example = tomllib.loads((REPO / "examples" / "lmbot-example" / "pyproject.toml").read_text(encoding="utf-8"))
    assert example["project"]["entry-points"]["lmbot"] == {"example": "lmbot_example"}


def test_the_readme_is_a_short_front_page_linking_every_docs_page() -> None:
    readme = README.read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for page in ("commands", "operating", "performance", "architecture", "plugins", "writing-a-plugin", "testing"):
        assert f"(docs/{page}.md)" in readme and (REPO / "docs" / f"{page}.md").is_file(), page


def test_operating_md_gets_an_admin_a_bot_that_survives_outages_and_reboots() -> None:
    text = (REPO / "docs" / "operating.md").read_text(encoding="utf-8")
    for step in (
        "systemctl enable --now lmbot",
        "journalctl -eu lmbot",
        "deploy/lmbot.service",
        "EnvironmentFile",
        "quiz.sqlite3",
        "docker compose",
    ):
        assert step in text, step
