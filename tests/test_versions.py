"""The transformers releases Menos supports: declared once, checked at start, and the
one API that differs inside the range (the decoder blocks' cache keyword) handled."""

import configparser
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.opt.modeling_opt import OPTDecoderLayer

import menos
from menos import versions
from menos.surgery import cache_keyword

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared() -> SpecifierSet:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    lines = [ln.split("#")[0].strip() for ln in cfg["options"]["install_requires"].splitlines()]
    (req,) = [Requirement(ln) for ln in lines if ln and Requirement(ln).name == "transformers"]
    return req.specifier


def test_setup_cfg_declares_the_range_that_is_checked():
    assert _declared() == SpecifierSet(versions.TRANSFORMERS)
    assert versions.OLDEST_TRANSFORMERS in SpecifierSet(versions.TRANSFORMERS)
    assert versions.transformers_problem() is None  # the suite itself runs inside the range


@pytest.mark.parametrize("release", ["5.16.1", "5.25.0", "4.46.0"])
def test_a_release_outside_the_range_is_one_line(monkeypatch, release):
    monkeypatch.setattr("importlib.metadata.version", lambda name: release if name == "transformers" else "0")
    problem = versions.transformers_problem()
    assert problem and f"transformers {release} is installed" in problem and versions.TRANSFORMERS in problem
    with pytest.raises(RuntimeError, match=f"transformers {release} is installed"):
        menos.connect("tcp://127.0.0.1:9", connect_timeout_s=0.5)  # refused before any connection


def test_the_manager_refuses_an_unsupported_transformers_before_loading_anything(tmp_path):
    """A distribution's metadata found first on the path stands for another installed release."""
    fake = tmp_path / "site"
    (fake / "transformers-5.16.1.dist-info").mkdir(parents=True)
    (fake / "transformers-5.16.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.16.1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), REPO, *os.environ.get("PYTHONPATH", "").split(os.pathsep)])}
    out = subprocess.run([sys.executable, "-m", "manager", "start", "--state-dir", str(tmp_path / "state")],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "transformers 5.16.1 is installed" in out.stderr, out.stderr
    assert not (tmp_path / "state").exists()


def test_blocks_get_their_cache_by_the_keyword_their_release_takes():
    kw = {cache_keyword(object.__new__(cls)) for cls in (LlamaDecoderLayer, OPTDecoderLayer)}
    assert kw in ({"cache"}, {"past_key_values"})  # 5.24 on / before

    class Old:
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs): ...

    class New:
        def forward(self, hidden_states, attention_mask=None, cache=None, past_key_values=None, **kwargs): ...

    class NoCache:
        def forward(self, hidden_states, **kwargs): ...

    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(New()) == "cache"
    with pytest.raises(TypeError, match="takes no key/value cache"):
        cache_keyword(NoCache())
