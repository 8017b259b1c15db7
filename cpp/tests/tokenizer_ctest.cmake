# ctest driver for wqedge_tokenizer_test (cmake -DEXE=... [-DEMULATOR=qemu-...] -DDATA=... -DWORK=... -P
# tokenizer_ctest.cmake; EMULATOR is CMAKE_CROSSCOMPILING_EMULATOR, which ctest applies only to plain COMMANDs):
# self-contained vocabularies in data/ (a SentencePiece one whose piece scores spell out "▁hello" and
# "▁world" by merges, and a byte-level BPE one with merges for "hello" and "Ġworld"); expected ids
# derived by hand from the merge rules in tokenizer.cpp. Encodes three texts (merges, byte fallback /
# bytes of unknown characters, a two-byte UTF-8 character), then decodes the ids back to the texts.
# The full comparison against Hugging Face on real vocabularies is tests/test_cpp_tokenizer.py.
separate_arguments(EMU UNIX_COMMAND "${EMULATOR}")
set(texts hello.txt hi.txt e_acute.txt)
set(spm_expected "1\n271\n276\n---\n1\n267\n108\n36\n---\n1\n259\n198\n172\n---\n")  # BOS; ▁hello ▁world | ▁h <0x69> <0x21> | ▁ <0xC3> <0xA9>
set(bpe_expected "259\n264\n---\n104\n105\n33\n---\n195\n169\n---\n")              # hello Ġworld | h i ! | Ã ©
file(MAKE_DIRECTORY "${WORK}")
foreach(v spm bpe)
  set(args)
  foreach(t ${texts})
    list(APPEND args "${DATA}/${t}")
  endforeach()
  execute_process(COMMAND ${EMU} "${EXE}" encode "${DATA}/${v}.vocab" ${args} OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0 OR NOT out STREQUAL "${${v}_expected}")
    message(FATAL_ERROR "${v}: encode gave (exit ${rc}) '${out}' ${err}, expected '${${v}_expected}'")
  endif()
  # decode: the ids of each text back to the text (BOS dropped, SentencePiece's leading space stripped)
  string(REPLACE "---\n" ";" groups "${out}")
  set(i 0)
  set(dargs)
  foreach(t ${texts})
    list(GET groups ${i} ids)
    file(WRITE "${WORK}/${v}-${i}.ids" "${ids}")
    list(APPEND dargs "${WORK}/${v}-${i}.ids" "${WORK}/${v}-${i}.out")
    math(EXPR i "${i} + 1")
  endforeach()
  execute_process(COMMAND ${EMU} "${EXE}" decode "${DATA}/${v}.vocab" ${dargs} RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${v}: decode failed (exit ${rc}): ${err}")
  endif()
  set(i 0)
  foreach(t ${texts})
    file(READ "${DATA}/${t}" want)
    file(READ "${WORK}/${v}-${i}.out" got)
    if(NOT got STREQUAL want)
      message(FATAL_ERROR "${v}: decode of ${t}'s ids gave '${got}', expected '${want}'")
    endif()
    math(EXPR i "${i} + 1")
  endforeach()
  # out-of-range and negative ids are skipped, never a crash
  file(WRITE "${WORK}/${v}-bad.ids" "-1 99999 2147483647 -2147483648")
  execute_process(COMMAND ${EMU} "${EXE}" decode "${DATA}/${v}.vocab" "${WORK}/${v}-bad.ids" "${WORK}/${v}-bad.out" RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${v}: decode of out-of-range ids failed (exit ${rc})")
  endif()
endforeach()
message(STATUS "tokenizer: spm and bpe encode/decode as expected")
