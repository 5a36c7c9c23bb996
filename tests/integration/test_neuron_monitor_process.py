"""`neuron-monitor` as a child process: a stand-in binary's reports reach the collector, a line
that is not JSON is counted, and stopping the monitor ends the process and removes its config."""

import json
import stat
import sys
import time
from pathlib import Path

import pytest

from neuronserve.serve import neuron_monitor as nm
from neuronserve.serve.neuron_monitor import NeuronMonitorCollector

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "neuron_monitor_report.json"


@pytest.fixture
def raw():
    return json.loads(FIXTURE.read_text())


def _fake_monitor(tmp_path: Path, raw) -> Path:
    """A stand-in neuron-monitor: records its argv, prints one report per line, then a report
    pretty-printed over several lines, then waits to be terminated."""
    script = tmp_path / "neuron-monitor"
    one_line = json.dumps(raw)
    multi_line = json.dumps(raw, indent=2)
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, time\n"
        f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv))\n"
        f"print({one_line!r}, flush=True)\n"
        "print('not json at all', flush=True)\n"
        f"print({multi_line!r}, flush=True)\n"
        "time.sleep(60)\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_subprocess_feeds_collector_and_stops(tmp_path, raw):
    binary = _fake_monitor(tmp_path, raw)
    collector = NeuronMonitorCollector()
    mon = nm.start_neuron_monitor(collector, binary=str(binary), period_s=1.0)
    assert mon is not None
    try:
        deadline = time.monotonic() + 20
        while collector._reports < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert collector._reports == 2
        assert collector._bad_lines == 1
        argv = json.loads((tmp_path / "argv.json").read_text())
        assert argv[1] == "-c"
        assert json.loads(Path(argv[2]).read_text()) == nm.monitor_config(1.0)
    finally:
        mon.stop()
    assert mon._proc.poll() is not None
    assert not Path(argv[2]).exists()
