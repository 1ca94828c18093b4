SELECT count(*) FROM generations WHERE status IN ('queued', 'running')
