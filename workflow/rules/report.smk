# Tables, figures and the report read the scores only, in seconds: the head node's work.
localrules:
    summarize,
    figures,
    report,


checkpoint summarize:
    input:
        scores=[
            f
            for kind in ("per_example", "summary", "by_category")
            for f in run_files(paths.scores()[kind])
        ],
        stats=finetune_files(paths.TRAIN_STATS),
        histories=finetune_files(paths.HISTORY),
    output:
        summary=report(
            paths.SUMMARY, caption="../report/summary.rst", category="Summary"
        ),
        by_category=paths.SUMMARY_BY_CATEGORY,
        cells=paths.CELL_SUMMARY,
        comparisons=paths.COMPARISONS,
    log:
        paths.log("report", "summarize"),
    conda:
        "../envs/data.yaml"
    params:
        **config["score"],
        runs=RUNS,
    script:
        "../scripts/summarize.py"


rule figures:
    input:
        summary=paths.SUMMARY,
        cells=paths.CELL_SUMMARY,
        by_category=paths.SUMMARY_BY_CATEGORY,
        histories=finetune_files(paths.HISTORY),
    output:
        png=[
            report(
                paths.figure(name, "png"),
                caption=f"../report/{name}.rst",
                category="Figures",
            )
            for name in paths.FIGURE_NAMES
        ],
        pdf=figure_files("pdf"),
    log:
        paths.log("report", "figures"),
    conda:
        "../envs/data.yaml"
    # The figures are drawn in processes side by side (lorastudy.plots.render_figures).
    threads: 8
    params:
        runs=RUNS,
    script:
        "../scripts/figures.py"


rule report:
    input:
        summary=paths.SUMMARY,
        cells=paths.CELL_SUMMARY,
        comparisons=paths.COMPARISONS,
        by_category=paths.SUMMARY_BY_CATEGORY,
        split_counts=paths.SPLIT_COUNTS,
        duplicates=paths.DUPLICATES,
        figures=figure_files("png"),
        generations=run_files(paths.generations()),
        generation_stats=run_files(paths.generation_stats()),
        stats=finetune_files(paths.TRAIN_STATS),
    output:
        paths.REPORT,
    log:
        paths.log("report", "report"),
    conda:
        "../envs/data.yaml"
    params:
        runs=RUNS,
        figures=dict(zip(paths.FIGURE_NAMES, figure_files("png"))),
        config=config,
        repo=workflow.basedir,
        examples_per_category=config["report"]["examples_per_category"],
    script:
        "../scripts/report.py"
