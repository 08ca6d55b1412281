"""Reports of gate runs and fuzz campaigns, for CI and for people.

    junit.py    the gate as JUnit XML (one test per corpus case and per fuzz segment)
    sarif.py    the gate's findings as SARIF 2.1.0 (GitHub code scanning)
    summary.py  the gate as Markdown ($GITHUB_STEP_SUMMARY, a pull-request comment)
    rundir.py   reading a fuzz campaign's run directory
    html.py     one self-contained HTML page per campaign (plotly, inlined)

Nothing here runs a case: every writer takes a finished result (`harness.gate.GateResult`, a
run directory) and writes one file atomically.
"""
