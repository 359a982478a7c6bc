"""meltbench's benchmark side: config, probes, scenarios, runner, result rows and reports."""
