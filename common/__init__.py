"""What every part of moestream uses and none of them owns: the error base, byte sizes, files
written atomically, Hub error text, the installed version. Imports nothing else of moestream, so
manifests, stages, flows and runtime can all depend on it."""
