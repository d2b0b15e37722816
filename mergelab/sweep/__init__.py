"""Running many merges: what to merge (`plan`), one size's merges evaluated (`evaluator`), the local
and Ray backends (`local`, `ray_backend`), the sweep itself (`runner`), and the job queue and worker
process behind the dashboard (`jobs`, `worker`)."""
