"""compute-sanitizer over corpus cases: the sanitizer's process, its reports, triage.

    run.py     runs a batch of cases under one sanitizer tool (or bare), in a child process
    child.py   that child: replays the cases with a marker line around every stage
    report.py  parses the sanitizer's XML and text output into records per case and stage
    triage.py  replays findings under every tool and sorts them by what detects them
"""
