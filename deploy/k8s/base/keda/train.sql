SELECT (SELECT count(*) FROM trainings WHERE status IN ('queued', 'running'))
     + (SELECT count(*) FROM evaluations WHERE status IN ('queued', 'running'))
