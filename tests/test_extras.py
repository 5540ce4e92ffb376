"""Optional dependencies: a command that needs a missing extra says which one to install."""

import pytest

import lina.extras as extras
from lina.cluster.netns import Support, require_support
from lina.errors import LinaError


def test_missing_matplotlib_skips_the_png_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(extras, "installed", lambda module: module != "matplotlib")
    assert extras.pyplot("out.png") is None
    assert not extras.can_plot("x.png")
    err = capsys.readouterr().err
    assert "out.png not drawn" in err and "pip install 'lina[plots]'" in err


def test_present_matplotlib_gives_pyplot():
    plt = extras.pyplot("out.png")
    assert plt is not None and hasattr(plt, "subplots")


def test_missing_pyroute2_names_the_cluster_extra():
    support = Support(net_admin=True, ip_binary="/sbin/ip", netns=True, pyroute2=False)
    with pytest.raises(LinaError, match=r"lina\[cluster\]"):
        require_support(support)
