"""The shipped calibration texts (data only; see README.md). A package so that importlib.resources
finds the files when moestream is installed from a wheel."""
