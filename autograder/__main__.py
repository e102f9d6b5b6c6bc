"""Command line of the autograder.

    python -m autograder grade LAB|all --target labs|reference|PATH [--json FILE] [--csv FILE]
    python -m autograder grade-many SUBMISSIONS --labs 01 03 --out grades/ [--ray auto]   grade a class
    python -m autograder doctor
    python -m autograder mutate LAB [--budget N]         mutation-test a lab's graded tests
    python -m autograder stubs [--check]                 regenerate labs/ from reference/
    python -m autograder release OUT [--nbgrader COURSE] write the student release (and an nbgrader course)
    python -m autograder slides [LAB ...] [--check]      render lecture decks to offline reveal.js HTML

`grade` exits 0 when grading finished, whatever the score, and non-zero only when the grader itself failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from autograder import runner
from autograder.release import ReleaseError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograder", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    grade = commands.add_parser("grade", help="grade a lab (01, lab01_memory, ...) or all labs")
    grade.add_argument("lab", help="a lab number or folder name, or 'all'")
    grade.add_argument("--target", default="labs", help="labs (default), reference, or a submission directory/zip")
    grade.add_argument("--json", help="write Gradescope's results.json here")
    grade.add_argument("--csv", help="write one CSV row per test here")
    grade.add_argument("--tests", nargs="*", help="only these test files of the lab (e.g. test_checkpoint.py)")
    grade.add_argument("--public-only", action="store_true", help="skip hidden tests (what students can run)")
    grade.add_argument("--quiet", action="store_true", help="the table without failure details")
    grade.add_argument("--progress", choices=("bar", "lines", "off"),
                       help="progress while grading (default: a bar on a terminal, plain lines otherwise)")
    grade.add_argument("--time-limit-scale", type=float, default=float(os.environ.get("SLM_TIME_LIMIT_SCALE", 1.0)),
                       help="multiply every test's time limit, and run_distributed's inside the worker (a slow "
                            "machine: 2; default $SLM_TIME_LIMIT_SCALE or 1)")
    grade.add_argument("--jail", choices=("auto", "require", "off"), default=os.environ.get("SLM_JAIL", "auto"),
                       help="confine student code with bubblewrap: auto (if available, else warn), require, off")

    many = commands.add_parser("grade-many", help="grade a folder of submissions (<student>/ or <student>.zip), "
                               "here or on a Ray cluster")
    many.add_argument("submissions", help="a folder of <student>/ folders and <student>.zip files")
    many.add_argument("--labs", nargs="+", required=True, help="lab numbers or folder names, or 'all'")
    many.add_argument("--out", required=True, help="folder for the records, results.json per student, grades.csv "
                      "and the summary")
    many.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster: auto (the running one), local (start "
                      "one here), or HOST:PORT; default: this machine, without Ray")
    many.add_argument("--jobs", type=int, help="without --ray: tasks at once (default: the cores over the CPUs the "
                      "labs' distributed tests need)")
    many.add_argument("--retries", type=int, default=2, help="retry a task the grader failed on (a dead node, a "
                      "time-out) this many times, then report 'grader error' (default 2)")
    many.add_argument("--task-time-limit", type=float, help="seconds for one lab of one student (default "
                      f"{runner.LAB_TIME_LIMIT_S} x --time-limit-scale)")
    many.add_argument("--force", action="store_true", help="regrade what is already graded")
    many.add_argument("--tests", nargs="*", help="only these test files of each lab")
    many.add_argument("--public-only", action="store_true", help="skip hidden tests")
    many.add_argument("--progress", choices=("bar", "lines", "off"),
                      help="progress (default: a bar on a terminal, plain lines otherwise)")
    many.add_argument("--time-limit-scale", type=float, default=float(os.environ.get("SLM_TIME_LIMIT_SCALE", 1.0)))
    many.add_argument("--jail", choices=("auto", "require", "off"), default=os.environ.get("SLM_JAIL", "auto"))

    commands.add_parser("doctor", help="what this machine can grade")

    mutate = commands.add_parser("mutate", help="mutation-test a lab's graded tests against bugs in the reference")
    mutate.add_argument("lab", help="a lab number or folder name")
    mutate.add_argument("--budget", type=int, help="grade a random sample of this many mutants (default: all)")
    mutate.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants graded at once (default: cores)")
    mutate.add_argument("--seed", type=int, default=0, help="the sample's seed")
    mutate.add_argument("--only", nargs="*", default=(), help="only mutants whose id contains one of these")
    mutate.add_argument("--json", help="write every mutant and its outcome here")
    mutate.add_argument("--jail", choices=("auto", "require", "off"), default=os.environ.get("SLM_JAIL", "auto"))
    mutate.add_argument("--time-limit-scale", type=float, default=float(os.environ.get("SLM_TIME_LIMIT_SCALE", 1.0)))

    stubs = commands.add_parser("stubs", help="regenerate the student stubs in labs/ from reference/")
    stubs.add_argument("--check", action="store_true", help="fail if labs/ differs instead of writing")
    stubs.add_argument("--force", action="store_true",
                       help="overwrite stubs even where they hold edits (yours or a student's) that git does not have")

    slides = commands.add_parser("slides", help="render lecture decks to offline reveal.js HTML")
    slides.add_argument("labs", nargs="*", help="lab numbers or folder names (default: every deck)")
    slides.add_argument("--out", default="slides/_build", help="folder for the HTML and reveal.js (default slides/_build)")
    slides.add_argument("--target", default=None, help="run the decks on: reference (default in a kit checkout), labs")
    slides.add_argument("--check", action="store_true", help="also check each deck in headless Chromium at 1280x720")

    release = commands.add_parser("release", help="write the student release directory")
    release.add_argument("out", help="the directory to create")
    release.add_argument("--nbgrader", metavar="COURSE",
                         help="also write an nbgrader course (source/, release/, config) to this separate folder")
    release.add_argument("--labs", nargs="*", help="only these labs (numbers or folder names); default all")

    args = parser.parse_args(argv)
    try:
        if args.command == "grade":
            labs = runner.discover_labs() if args.lab == "all" else [args.lab]
            progress = args.progress or ("bar" if sys.stderr.isatty() else "lines")
            options = runner.Options(tests=tuple(args.tests or ()), include_hidden=not args.public_only,
                                     time_limit_scale=args.time_limit_scale, jail=args.jail, progress=progress)
            card = runner.grade(labs, args.target, options)
            if args.json:
                card.write_gradescope(args.json)
            if args.csv:
                card.write_csv(args.csv)
            print(card.table(verbose=not args.quiet))
        elif args.command == "grade-many":
            from autograder import grade_many

            labs = runner.discover_labs() if args.labs == ["all"] else args.labs
            options = runner.Options(tests=tuple(args.tests or ()), include_hidden=not args.public_only,
                                     time_limit_scale=args.time_limit_scale, jail=args.jail,
                                     lab_time_limit_s=args.task_time_limit)
            plan = grade_many.Plan(labs=tuple(labs), out=Path(args.out), ray=args.ray, jobs=args.jobs,
                                   retries=args.retries, force=args.force, options=options,
                                   progress=args.progress or ("bar" if sys.stderr.isatty() else "lines"))
            records = grade_many.grade_many(args.submissions, plan)
            errors = sum(r["status"] == "grader error" for by_lab in records.values() for r in by_lab.values())
            print(f"{len(records)} students graded into {args.out}: grades.csv, summary.md, summary.png, "
                  f"<student>/results.json" + (f"; {errors} task(s) hit a grader error (re-run to retry)"
                                               if errors else ""))
        elif args.command == "mutate":
            import json

            from autograder import mutate as mutation

            lab = runner.resolve_lab(args.lab)
            outcomes = mutation.run(lab, budget=args.budget, jobs=args.jobs, seed=args.seed, jail=args.jail,
                                    time_limit_scale=args.time_limit_scale, only=tuple(args.only))
            print(mutation.report(lab, outcomes))
            if args.json:
                Path(args.json).write_text(json.dumps(mutation.to_json(lab, outcomes), indent=1))
        elif args.command == "slides":
            from autograder import decks

            names = [runner.resolve_lab(lab) for lab in args.labs] or None
            found = decks.decks(names)
            if not found:
                raise runner.GraderError("no deck found under slides/")
            for deck in found:
                html = decks.render_deck(deck, Path(args.out), target=args.target)
                line = f"{deck.stem}: {html}"
                if args.check:
                    report = decks.check_in_browser(html)
                    problems = [f"slide {p['slide']}: {p['what']}" for p in report["overflow"]]
                    line += f"  ({report['slides']} slides; " + ("; ".join(problems) or "all fit 1280x720") + ")"
                print(line)
        elif args.command == "doctor":
            from autograder import doctor

            print(doctor.report())
        elif args.command == "stubs":
            from autograder import release as release_tool

            changed = release_tool.sync_stubs(check=args.check, force=args.force)
            if args.check and changed:
                print("labs/ is out of date with reference/ for:\n  " + "\n  ".join(changed))
                return 1
            print(f"{len(changed)} stub file(s) {'differ' if args.check else 'rewritten'}")
        elif args.command == "release":
            from autograder import release as release_tool

            labs = [runner.resolve_lab(lab) for lab in args.labs] if args.labs else None
            if args.nbgrader and Path(args.nbgrader).resolve().is_relative_to(Path(args.out).resolve()):
                raise release_tool.ReleaseError("the nbgrader course is the instructor's (it holds gradebook.db): "
                                                "write it outside the student release")
            out = release_tool.write_release(args.out, labs=labs)
            print(f"student release written to {out}")
            if args.nbgrader:
                course = release_tool.write_nbgrader_course(args.nbgrader, labs=labs)
                print(f"nbgrader course written to {course}")
    except (runner.GraderError, ReleaseError) as error:
        print(f"autograder: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
