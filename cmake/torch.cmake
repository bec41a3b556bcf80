# Locate torch from the Python interpreter instead of find_package(Torch):
# torch's CMake config is fatal for a CUDA torch on a host without nvcc, guesses the toolkit
# root from wrapper scripts, and injects arch flags nvcc 13 rejects. Headers + libs suffice.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import torch, torch.utils.cpp_extension as e; print('|'.join(e.include_paths())); print('|'.join(e.library_paths())); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.version.cuda or 'none'); print(torch.__version__)"
  OUTPUT_VARIABLE _torch_out RESULT_VARIABLE _torch_rc ERROR_VARIABLE _torch_err
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "dspark needs torch installed in the build interpreter (${Python_EXECUTABLE}); "
                      "install torch first and build with --no-build-isolation.\n${_torch_err}")
endif()
string(REPLACE "\n" ";" _torch_lines "${_torch_out}")
list(GET _torch_lines -5 _torch_inc)
list(GET _torch_lines -4 _torch_libdir)
list(GET _torch_lines -3 _torch_abi)
list(GET _torch_lines -2 DSPARK_TORCH_CUDA)
list(GET _torch_lines -1 DSPARK_TORCH_VERSION)
string(REPLACE "|" ";" _torch_inc "${_torch_inc}")
string(REPLACE "|" ";" _torch_libdir "${_torch_libdir}")

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
