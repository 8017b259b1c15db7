# wqedge tokenizer sources. Defines no targets and no global settings:
#   include(${CMAKE_CURRENT_SOURCE_DIR}/src/tokenizer.cmake)
#   target_sources(<your target> PRIVATE ${WQEDGE_TOKENIZER_SOURCES})
# (C++17; header: tokenizer.h next to this file.)
set(WQEDGE_TOKENIZER_SOURCES ${CMAKE_CURRENT_LIST_DIR}/tokenizer.cpp)
