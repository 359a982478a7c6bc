"""meltbench's benchmark side: config, probes, runner, result rows, reports and checks."""
