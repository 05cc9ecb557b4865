"""Build helper for CMakeLists.txt: prints "<root>;<library>" of the cuBLASLt that torch's nvidia
wheels ship (<root>/include/cublasLt.h and <root>/lib/libcublasLt.so*), or nothing."""
import glob
import importlib.util
import os

spec = importlib.util.find_spec("nvidia")
for top in (spec.submodule_search_locations if spec else []):
    for header in sorted(glob.glob(os.path.join(top, "*", "include", "cublasLt.h"))):
        root = os.path.dirname(os.path.dirname(header))
        libs = sorted(glob.glob(os.path.join(root, "lib", "libcublasLt.so*")))
        if libs:
            print(f"{root};{libs[0]}")
            raise SystemExit(0)
