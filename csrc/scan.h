#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace rela {

// One directory of an image folder, listed without following it further down.
struct DirListing {
  std::vector<std::string> images;   // "rel/name" of files whose name ends in an image extension
  std::vector<int64_t> sizes;        // their sizes in bytes (links followed), same order
  std::vector<std::string> others;   // "rel/name" of the other files
  std::vector<std::string> subdirs;  // "rel/name" of the folders in it (links to folders included)
  std::vector<uint8_t> links;        // 1 where subdirs[i] is a symbolic link
  std::string error;                 // empty, or "<path>\t<errno>" of what could not be read
  int64_t mtime_ns = 0, inode = 0, device = 0;  // of the directory, taken before it is read
};

// List root/rel (rel "" is root itself). Names starting with "." are skipped; both lists are
// sorted by bytes. An image that cannot be stat'ed (a dangling link) stops the listing with
// `error`. extensions are lower-case, with the dot.
DirListing list_dir(const std::string& root, const std::string& rel,
                    const std::vector<std::string>& extensions);

}  // namespace rela
