# Android (arm64-v8a) through the NDK's own toolchain file, with wqedge's defaults. NOT built or
# tested in wqedge's CI (no NDK there); see docs/neon.md.
#   cmake -S cpp -B build-android -DCMAKE_TOOLCHAIN_FILE=cpp/cmake/android-arm64.cmake \
#         -DANDROID_NDK=$ANDROID_NDK_HOME [-DANDROID_PLATFORM=android-24] -DWQEDGE_BUILD_TESTS=OFF
# The NEON kernels are selected at run time (every arm64-v8a CPU has Advanced SIMD); dot-product
# support is read with getauxval(AT_HWCAP) (API >= 18) and only reported.
if(NOT ANDROID_NDK)
  if(DEFINED ENV{ANDROID_NDK_HOME})
    set(ANDROID_NDK "$ENV{ANDROID_NDK_HOME}")
  elseif(DEFINED ENV{ANDROID_NDK})
    set(ANDROID_NDK "$ENV{ANDROID_NDK}")
  else()
    message(FATAL_ERROR "android-arm64.cmake: set ANDROID_NDK (or ANDROID_NDK_HOME) to the NDK root")
  endif()
endif()
if(NOT ANDROID_ABI)
  set(ANDROID_ABI arm64-v8a)
endif()
if(NOT ANDROID_PLATFORM)
  set(ANDROID_PLATFORM android-24)
endif()
if(NOT ANDROID_STL)
  set(ANDROID_STL c++_static)  # libwqedge.so then depends on no libc++_shared.so
endif()
include("${ANDROID_NDK}/build/cmake/android.toolchain.cmake")
