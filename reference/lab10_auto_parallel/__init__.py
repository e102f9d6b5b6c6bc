"""Lab 10 (capstone): automatic parallelisation: a cost model, Alpa's ILP and DP, a planner and run_plan."""
