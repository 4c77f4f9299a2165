"""Storage keys and their parsers live in datacredit.layout; each key it builds parses back."""

from __future__ import annotations

from datacredit import layout


def test_attempt_markers_and_results_round_trip_and_strangers_do_not_parse() -> None:
    for owner in (layout.PREPARE_STEP, "c0ffee12"):
        for name in (layout.FAILED_MARKER, layout.CREATED_MARKER):
            key = layout.attempt_marker(owner, 3, name)
            assert layout.parse_attempt_marker(key) == (owner, 3, name)
    assert layout.parse_coalition_result(layout.coalition_result("c0ffee12")) == "c0ffee12"
    for stranger in ("coalitions/c0ffee12/attempt-x/failed.json", "coalitions/c0ffee12/attempt-1/samples.png",
                     "prepare/result.json", "coalitions/a/b/attempt-1/failed.json", "results/attempt-1/failed.json"):
        assert layout.parse_attempt_marker(stranger) is None, stranger
    for stranger in ("coalitions/c0ffee12/attempt-1/result.json", "results/result.json", "prepare/result.json"):
        assert layout.parse_coalition_result(stranger) is None, stranger
    assert layout.attempt_dir("c0ffee12", 2) + "/" + layout.FAILED_MARKER == layout.attempt_marker(
        "c0ffee12", 2, layout.FAILED_MARKER)
