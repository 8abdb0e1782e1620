from pdlab.metrics.records import RequestRecord
from pdlab.plots import cdf_figure, save_figure, timeline_figure


def runs():
    def rec(i, arrival, first, finish, n_out, error=None):
        times = [first + k * (finish - first) / max(1, n_out - 1) for k in range(n_out)] if first is not None else []
        return RequestRecord(f"r{i}", "sim", "colocated", arrival, first, finish, 16, n_out, "length", times, error)

    colocated = [rec(i, 0.25 * i, 0.25 * i + 0.3, 0.25 * i + 1.5, 8) for i in range(20)]
    colocated.append(rec(20, 5.0, None, None, 0, error="timeout"))
    disaggregated = [rec(i, 0.25 * i, 0.25 * i + 0.1, 0.25 * i + 1.2, 8) for i in range(20)]
    return {"colocated": colocated, "disaggregated": disaggregated, "empty": []}


def test_figures_render_to_png_and_svg(tmp_path):
    paths = save_figure(cdf_figure(runs(), slo_ttft_s=0.5, slo_tpot_s=0.2), tmp_path / "plots" / "cdf")
    paths += save_figure(timeline_figure(runs()), tmp_path / "plots" / "timeline", formats=("png",))
    assert [p.name for p in paths] == ["cdf.png", "cdf.svg", "timeline.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_run_and_no_runs():
    assert len(timeline_figure({"only": runs()["colocated"]}).axes) == 1
    assert len(cdf_figure({}).axes) == 2
    assert len(timeline_figure({}).axes) == 1


def test_a_long_run_shows_a_sample_of_its_requests_and_says_so():
    many = {"long": [r for i in range(50) for r in runs()["colocated"][:20]]}  # 1,000 requests
    ax = timeline_figure(many, max_requests=300).axes[0]
    assert ax.get_title() == "long (1 in 4 of 1,000 requests)"
    drawn = sum(len(c.get_segments()) for c in ax.collections)  # both phases of each request drawn
    assert drawn == 2 * 250
    assert timeline_figure({"short": runs()["colocated"]}).axes[0].get_title() == "short"
