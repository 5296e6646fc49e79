"""Lightning callbacks: progressive resolution, throughput, prediction grids, bad samples."""
