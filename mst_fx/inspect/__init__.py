"""What mst finds in a model, what it rewrites, and what memory that saves.

    model_report.py     `ModelReport`: the graphs, their sites, the totals; its JSON form
    report_format.py    a report as the table `mst-inspect` prints, as JSON, or as graph code
    memory_estimate.py  the bytes a site keeps and adds, before and after the rewrite
    dry_run.py          trace a model and run the passes without compiling (`mst_fx.explain`)
    compiled_reports.py what the backend compiled so far (`mst_fx.last_report`)
    cli.py              `mst-inspect`

These import the passes (`mst_fx.passes`: the reports they write, the rewrite they run), the
built-in models (`mst_fx.models`, for the CLI's targets) and each other, never the modules above:
the backend records its reports here, and the options come in from the caller.
"""
