# Locate torch from the Python interpreter instead of find_package(Torch):
# torch's CMake config is fatal for a CUDA torch on a host without nvcc, guesses the toolkit
# root from wrapper scripts, and injects arch flags nvcc 13 rejects. Headers + libs suffice.
# DSPARK_TORCH_SITE (environment): a site-packages dir to import torch from first; the build
# backend (build_backend/dspark_build.py) sets it to the target environment's when pip builds in
# an isolated environment, so the build uses the torch that will run it.
# Also reports the visible GPUs' architectures (DSPARK_VISIBLE_ARCHS, e.g. "90", "" with none).
set(_torch_probe [=[
import os, sys
site = os.environ.get("DSPARK_TORCH_SITE")
if site:
    sys.path.insert(0, site)
try:
    import torch, torch.utils.cpp_extension as e
except Exception as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
print("|".join(e.include_paths()))
print("|".join(e.library_paths()))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.version.cuda or "none")
print(torch.__version__)
archs = []
try:
    if torch.version.cuda and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            archs.append(f"{major}{minor}")
except Exception:
    pass
print("|".join(sorted(set(archs))) or "none")
]=])
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "${_torch_probe}"
  OUTPUT_VARIABLE _torch_out RESULT_VARIABLE _torch_rc ERROR_VARIABLE _torch_err
  OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  string(REGEX REPLACE "\n.*" "" _torch_err "${_torch_err}")
  message(FATAL_ERROR "dspark builds against an installed torch, and ${Python_EXECUTABLE} "
                      "cannot import one (${_torch_err}): install torch first, then run "
                      "`pip install --no-build-isolation .`")
endif()
string(REPLACE "\n" ";" _torch_lines "${_torch_out}")
list(GET _torch_lines -6 _torch_inc)
list(GET _torch_lines -5 _torch_libdir)
list(GET _torch_lines -4 _torch_abi)
list(GET _torch_lines -3 DSPARK_TORCH_CUDA)
list(GET _torch_lines -2 DSPARK_TORCH_VERSION)
list(GET _torch_lines -1 DSPARK_VISIBLE_ARCHS)
string(REPLACE "|" ";" _torch_inc "${_torch_inc}")
string(REPLACE "|" ";" _torch_libdir "${_torch_libdir}")
string(REPLACE "|" ";" DSPARK_VISIBLE_ARCHS "${DSPARK_VISIBLE_ARCHS}")
if(DSPARK_VISIBLE_ARCHS STREQUAL "none")
  set(DSPARK_VISIBLE_ARCHS "")
endif()

add_library(dspark_torch INTERFACE)
target_include_directories(dspark_torch SYSTEM INTERFACE ${_torch_inc})
target_compile_definitions(dspark_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_torch_abi})
foreach(_lib c10 torch_cpu torch)
  find_library(_p_${_lib} ${_lib} PATHS ${_torch_libdir} NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(dspark_torch INTERFACE ${_p_${_lib}})
endforeach()

add_library(dspark_torch_cuda INTERFACE)
if(DSPARK_TORCH_CUDA STREQUAL "none")
  set(DSPARK_TORCH_CUDA "")
endif()
if(DSPARK_TORCH_CUDA)
  foreach(_lib c10_cuda torch_cuda)
    find_library(_p_${_lib} ${_lib} PATHS ${_torch_libdir} NO_DEFAULT_PATH)
    if(_p_${_lib})
      target_link_libraries(dspark_torch_cuda INTERFACE ${_p_${_lib}})
    endif()
  endforeach()
endif()
