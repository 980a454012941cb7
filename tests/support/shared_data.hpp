#pragma once
// The real data the tests read from ../shared/data (shared/data/MANIFEST.md describes each file): its root,
// from the QLORA_SHARED_DATA compile definition (../shared/data beside the checkout, or -DQLORA_SHARED_DATA=DIR
// on a GPU machine), the files the tests name, and the check that skips a test with one MESSAGE line where a
// file is absent.

#include <doctest/doctest.h>

#include <filesystem>
#include <initializer_list>

namespace qlora::test {

#if defined(QLORA_SHARED_DATA)
inline const std::filesystem::path kSharedData = QLORA_SHARED_DATA;
#else
inline const std::filesystem::path kSharedData;  // empty: every shared file is absent
#endif

// Karpathy's stories260K (llama2.c format: dim 64, 5 layers, vocabulary 512) and its tokenizer in llama2.c's
// format and as the SentencePiece model it was converted from.
inline const std::filesystem::path kStories260KDir = kSharedData / "models" / "stories260K";
inline const std::filesystem::path kStories260K = kStories260KDir / "stories260K.bin";
inline const std::filesystem::path kStories260KTokenizer = kStories260KDir / "tok512.bin";
inline const std::filesystem::path kStories260KSentencePiece = kStories260KDir / "tok512.model";
// A slice of TinyStories' validation split: stories260K's own domain.
inline const std::filesystem::path kTinyStoriesValid =
    kSharedData / "text" / "tinystories" / "TinyStories-valid-subset.txt";

// True when every one of `files` exists; otherwise the test's skip line, naming the first absent file
// (the caller returns: doctest counts the case as passed with the message beside it).
inline bool shared_files_present(std::initializer_list<std::filesystem::path> files) {
  for (const std::filesystem::path& file : files) {
    // An empty root would resolve the names against the working directory.
    if (kSharedData.empty() || !std::filesystem::exists(file)) {
      MESSAGE("skipped: " << file << " is absent (../shared/data not beside the checkout)");
      return false;
    }
  }
  return true;
}
inline bool shared_file_present(const std::filesystem::path& file) { return shared_files_present({file}); }

}  // namespace qlora::test
