# iOS (arm64 devices) with CMake's built-in iOS support; needs macOS + Xcode. NOT built or tested in
# wqedge's CI (no Xcode there); see docs/neon.md.
#   cmake -S cpp -B build-ios -G Xcode -DCMAKE_TOOLCHAIN_FILE=cpp/cmake/ios-arm64.cmake \
#         -DWQEDGE_BUILD_TESTS=OFF -DWQEDGE_BUILD_TOOLS=OFF
#   cmake --build build-ios --config Release --target wqedge_static
# Apps should link the static library (libwqedge.a) and include wqedge.h; iOS apps may not load
# arbitrary shared libraries outside a framework.
set(CMAKE_SYSTEM_NAME iOS)
if(NOT CMAKE_OSX_ARCHITECTURES)
  set(CMAKE_OSX_ARCHITECTURES arm64)
endif()
if(NOT CMAKE_OSX_DEPLOYMENT_TARGET)
  set(CMAKE_OSX_DEPLOYMENT_TARGET 13.0)
endif()
set(CMAKE_XCODE_ATTRIBUTE_ONLY_ACTIVE_ARCH NO)
