"""`lina bench contention` (small): runs on the emulated cluster, writes the JSON and the CDF plot.

Needs root and tc (CI runs as root); skipped otherwise.
"""

import json
import os
import shutil

import pytest

from lina.bench import contention
from lina.cluster import netns
from lina.cluster.emulate import survey

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or bool(netns.probe_support().missing()) or shutil.which("tc") is None,
        reason="needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), tc and ip to build network namespaces",
    ),
]


@pytest.mark.timeout(120)
def test_small_contention_run_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "contention.json"
    code = contention.main(
        ["--pairs", "4", "--warmup", "1", "--hosts", "3", "--link", "200mbit", "--a2a-elems", "49152",
         "--allreduce-elems", "262144", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("alone_s", "contended_s", "allreduce_s", "slowdown"):
        assert set(result[key]) >= {"median", "p95", "max", "min"}
    assert result["link"] == "200mbit" and result["link_bps"] == 200_000_000 and result["hosts"] == 3
    assert result["a2a_bytes_per_rank"] == 4 * 49152 and result["allreduce_bytes"] == 4 * 262144
    assert result["paper"]["max_slowdown"] == 4.14
    assert result["queue_ms"] == 100.0 and result["share"] == "peer" and len(result["link_counters"]) == 3
    assert result["link_packets"] > 0 and 0 <= result["link_drops"] <= result["link_packets"]
    assert len(result["samples"]["slowdown"]) == 4
    # an all-to-all over a limited link cannot beat the link (2/3 of 192 KiB at 200 Mbit/s),
    # except for what the token buckets let through at once
    burst_s = netns.htb_burst_bytes(200_000_000) * 8 / 200e6
    assert result["alone_s"]["min"] >= 0.95 * (result["a2a_link_bound_s"] - burst_s)
    middle = sorted(result["samples"]["slowdown"])[1:3]
    assert result["slowdown"]["median"] == pytest.approx(sum(middle) / 2)
    png = out.with_suffix(".png")
    assert png.exists() and png.stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "contention_timeline").iterdir()) == [
        f"contention.rank{r}.jsonl" for r in range(3)
    ]
    printed = capsys.readouterr().out
    assert "link 200mbit" in printed and "paper, Fig. 3" in printed and "pair 4/4" in printed
    # the cluster it built is gone
    assert netns.run_prefix_of(result["cluster"] + "-h0") == result["cluster"]
    assert netns.list_project_netns(result["cluster"] + "-") == []
    assert not [r for r in survey() if r.prefix == result["cluster"]]
