"""The built wheel is the product: it must carry the static files and the SQL migrations.

One wheel is built per session from a copy of the package (so the working tree gets no
``build/`` or ``*.egg-info``), with the real build backend that pyproject.toml names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, SECRET

BUILD_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(
        ROOT / "collector",
        source / "collector",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    out = work / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            # The venv's own setuptools (a test extra): nothing is downloaded at test time.
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(source),  # an absolute path: a bare name would be looked up on the index
        ],
        check=True,
        timeout=BUILD_TIMEOUT_S,
        capture_output=True,
    )
    (built,) = out.glob("collector-*.whl")
    return built


def test_wheel_ships_the_dashboard_the_banner_and_the_migrations(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "collector/static/dashboard/index.html",
        "collector/static/dashboard/dashboard.js",
        "collector/static/consent.js",
        "collector/static/consent.css",
        "collector/static/pixel.js",
        "collector/static/demo/index.html",
        "collector/static/vendor/uplot/uPlot.iife.min.js",
        "collector/static/vendor/uplot/LICENSE",
        "collector/storage/migrations/sqlite/0001_core.sql",
        "collector/storage/migrations/postgres/0001_core.sql",
        "collector/py.typed",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    # Every migration of the source tree is in the wheel, for both backends.
    migrations = ROOT / "collector" / "storage" / "migrations"
    for sql in migrations.glob("*/*.sql"):
        assert f"collector/storage/migrations/{sql.parent.name}/{sql.name}" in names


def test_installed_wheel_serves_the_dashboard_and_the_banner(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        timeout=BUILD_TIMEOUT_S,
        capture_output=True,
    )
    # The installed copy must come first: the source tree is not on this path.
    script = textwrap.dedent(
        """
        import asyncio, sys
        import httpx
        import collector.app
        from collector.app import create_app
        from collector.config import load_settings

        assert collector.app.__file__.startswith(sys.argv[1]), collector.app.__file__
        settings = load_settings(None, environ={
            "COLLECTOR_STORAGE_PATH": sys.argv[2],
            "COLLECTOR_CONSENT_SECRET": sys.argv[3],
        })

        async def main():
            transport = httpx.ASGITransport(app=create_app(settings))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                for path in ("/dashboard/", "/static/consent.js", "/static/pixel.js"):
                    r = await c.get(path)
                    print(path, r.status_code, len(r.content))
                    assert r.status_code == 200 and r.content, path

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", script, str(site), str(tmp_path / "c.db"), SECRET],
        env=env,
        cwd=tmp_path,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "/dashboard/ 200" in result.stdout
