# Turns the user's AUTO|ON|OFF choices into QLORA_WITH_CUDA / QLORA_WITH_MPI (ON or OFF).
# AUTO builds a backend when its toolchain is found; ON fails loudly when it is not.

include(CheckLanguage)

set(QLORA_WITH_CUDA OFF)
if(NOT QLORA_CUDA STREQUAL "OFF")
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(QLORA_WITH_CUDA ON)
  elseif(QLORA_CUDA STREQUAL "ON")
    message(FATAL_ERROR "QLORA_CUDA=ON but no CUDA compiler was found (put nvcc on PATH or set CMAKE_CUDA_COMPILER)")
  endif()
endif()
if(QLORA_WITH_CUDA)
  # Ampere and Hopper; sm_90a is added per target where Hopper-only instructions (wgmma, TMA) are used.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 80 90)
  endif()
  enable_language(CUDA)
  # CMake 3.25 predates nvcc's C++20 support and does not know its flag: teach it, then ask for C++20.
  if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
endif()

set(QLORA_WITH_MPI OFF)
if(NOT QLORA_MPI STREQUAL "OFF")
  find_package(MPI COMPONENTS CXX QUIET)
  if(MPI_CXX_FOUND)
    set(QLORA_WITH_MPI ON)
  elseif(QLORA_MPI STREQUAL "ON")
    message(FATAL_ERROR "QLORA_MPI=ON but no MPI was found (apt-get install libopenmpi-dev openmpi-bin)")
  endif()
endif()

# NCCL (GPU collectives of the dist layer) comes with CUDA when its header and library are found: Debian's
# libnccl-dev, NVIDIA's packages, or a prefix given as NCCL_ROOT (CMake variable or environment).
set(QLORA_WITH_NCCL OFF)
if(QLORA_WITH_CUDA)
  find_path(QLORA_NCCL_INCLUDE_DIR nccl.h HINTS ${NCCL_ROOT} $ENV{NCCL_ROOT} ${CUDAToolkit_INCLUDE_DIRS}
            PATH_SUFFIXES include)
  find_library(QLORA_NCCL_LIBRARY NAMES nccl libnccl.so.2 NAMES_PER_DIR HINTS ${NCCL_ROOT} $ENV{NCCL_ROOT} ${CUDAToolkit_LIBRARY_DIR}
               PATH_SUFFIXES lib lib64)
  if(QLORA_NCCL_INCLUDE_DIR AND QLORA_NCCL_LIBRARY)
    set(QLORA_WITH_NCCL ON)
    message(STATUS "qlora: NCCL found (${QLORA_NCCL_LIBRARY}): the NCCL communicator is built")
  else()
    message(STATUS "qlora: NCCL not found (apt-get install libnccl-dev, or set NCCL_ROOT): "
                   "the NCCL communicator is not built; CUDA ranks cannot communicate")
  endif()
endif()
